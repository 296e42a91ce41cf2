"""free_port: ports that neither Ray nor the kernel hands out by themselves, never the same twice."""

from __future__ import annotations

import socket

from cluster import sockets
from cluster.sockets import RAY_WORKER_PORTS_END, ephemeral_start, free_port


def test_ports_lie_between_rays_workers_and_the_ephemeral_range_and_are_distinct_and_bindable():
    ports = [free_port() for _ in range(200)]
    assert len(set(ports)) == len(ports)
    assert all(RAY_WORKER_PORTS_END < port < ephemeral_start() for port in ports)
    with socket.socket() as s:
        s.bind(("127.0.0.1", ports[-1]))


def test_the_kernel_never_hands_the_picked_port_to_a_port_0_listener_or_an_outgoing_connection():
    picked = free_port()
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(512)
        clients = [socket.create_connection(server.getsockname()) for _ in range(300)]
        listeners = [socket.socket() for _ in range(300)]
        try:
            for s in listeners:
                s.bind(("127.0.0.1", 0))
            taken = {s.getsockname()[1] for s in clients + listeners}
        finally:
            for s in clients + listeners:
                s.close()
    assert len(taken) == 600 and picked not in taken
    with socket.socket() as s:
        s.bind(("127.0.0.1", picked))


def test_a_port_in_use_is_never_returned(monkeypatch):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", RAY_WORKER_PORTS_END + 1))
        busy.listen()
        monkeypatch.setattr(sockets, "ephemeral_start", lambda: RAY_WORKER_PORTS_END + 1 + sockets.TRIES + 1)
        drawn = {free_port() for _ in range(sockets.TRIES - 1)}
    assert RAY_WORKER_PORTS_END + 1 not in drawn


def test_a_range_too_narrow_to_draw_from_falls_back_to_the_kernel(monkeypatch):
    monkeypatch.setattr(sockets, "ephemeral_start", lambda: RAY_WORKER_PORTS_END + 3)
    port = free_port()
    assert port >= RAY_WORKER_PORTS_END + 3
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
