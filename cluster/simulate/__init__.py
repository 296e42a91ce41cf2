"""Discrete-event simulation of a gptoss-cluster: N replicas behind the real routing policies
(cluster/serving/routing_policy.py) and the real autoscaling decision (cluster/serving/autoscaling.py).
`gptoss-cluster simulate` runs it (cluster/cli/simulate.py)."""
