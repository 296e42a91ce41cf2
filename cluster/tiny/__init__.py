"""gpt-oss-tiny: the curriculum it learns, its training and its evaluation (a tool: no layer imports
it; the serving path reads only the trained artifact, through cluster/model/trained.py)."""
