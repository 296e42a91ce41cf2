"""Every Ray Serve internal cluster/serving/serve_internals.py uses, checked against the installed Ray.

Pinned to the Ray version the module was written for: after a Ray upgrade this file fails first,
naming the item that moved, before traffic silently takes the slow handle path. The live test
runs the items on a real Serve deployment; the others read Ray's own classes.
"""

from __future__ import annotations

import asyncio
import inspect
import logging

import pytest
import ray
from prometheus_client import REGISTRY

from cluster.serving import serve_internals

PINNED_RAY = "2.60.0"


def test_ray_is_the_version_the_internals_were_checked_against():
    assert ray.__version__ == PINNED_RAY, (
        f"Ray {ray.__version__} is installed; serve_internals.py was checked against {PINNED_RAY}. Re-check every "
        "item there (and this file), then move PINNED_RAY.")


def test_handle_options_and_init_take_the_private_keywords():
    from ray.serve._private.handle_options import DynamicHandleOptions, InitHandleOptions
    from ray.serve.handle import DeploymentHandle

    assert "_by_reference" in {f for f in DynamicHandleOptions.__dataclass_fields__}, "BY_GRPC: _by_reference is gone"
    for key in serve_internals.BY_GRPC:
        assert key in inspect.signature(DeploymentHandle.options).parameters, f"DeploymentHandle.options lost {key}"
    assert "_run_router_in_separate_loop" in InitHandleOptions.__dataclass_fields__, "bind_to_running_loop"
    assert callable(getattr(DeploymentHandle, "_init", None)), "bind_to_running_loop: DeploymentHandle._init is gone"


def test_the_router_objects_still_hold_what_we_read():
    from ray.serve._private.request_router.request_router import RequestRouter
    from ray.serve._private.router import AsyncioRouter, CurrentLoopRouter, SharedRouterLongPollClient

    assert "self._asyncio_router" in inspect.getsource(CurrentLoopRouter.__init__), "request_router"
    assert isinstance(inspect.getattr_static(AsyncioRouter, "request_router"), property), "request_router"
    router_init = inspect.getsource(AsyncioRouter.__init__)
    for attribute in ("self._controller_handle", "self._event_loop"):
        assert attribute in router_init, f"close_bound_handle: AsyncioRouter {attribute}"
    assert "self.long_poll_client" in inspect.getsource(AsyncioRouter), "close_bound_handle: long_poll_client"
    assert callable(SharedRouterLongPollClient.get_or_create), "close_bound_handle"
    assert "self._deployment_id" in inspect.getsource(RequestRouter.__init__), "router_deployment"


def test_the_controller_is_found_by_its_private_name():
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE
    from ray.serve._private.controller import ServeController

    assert SERVE_CONTROLLER_NAME and SERVE_NAMESPACE
    assert callable(getattr(ServeController, "get_serve_instance_details", None)), "ReplicaCounts"


def test_the_serve_client_still_caches_the_handles_it_gives_out():
    from ray.serve._private.client import ServeControllerClient
    from ray.serve.context import _get_global_client

    assert "raise_if_no_controller_running" in inspect.signature(_get_global_client).parameters, \
        "shutdown_cached_handles: _get_global_client"
    assert callable(getattr(ServeControllerClient, "shutdown_cached_handles", None)), "shutdown_cached_handles"
    assert "self.handle_cache[cache_key] = handle" in inspect.getsource(ServeControllerClient.get_handle), \
        "shutdown_cached_handles: get_handle no longer caches"


def unavailable_count(item: str) -> float:
    return REGISTRY.get_sample_value("gptoss_serve_internal_unavailable_total", {"item": item}) or 0.0


def test_a_missing_internal_is_counted_and_warned_once(caplog):
    class HandleWithoutCurrentLoopRouter:  # what a handle looks like if Serve renamed _asyncio_router
        _router = object()

    item = "DeploymentHandle._router._asyncio_router"
    before = unavailable_count(item)
    serve_internals._warned.discard(item)
    with caplog.at_level(logging.WARNING, logger="cluster.serving.serve_internals"):
        assert serve_internals.request_router(HandleWithoutCurrentLoopRouter()) is None
        assert serve_internals.request_router(HandleWithoutCurrentLoopRouter()) is None
    assert unavailable_count(item) == before + 2
    warnings = [r for r in caplog.records if item in r.getMessage()]
    assert len(warnings) == 1 and "Serve handle path" in warnings[0].getMessage()


def test_every_item_works_on_a_live_deployment(ray_serving):
    from cluster.serving.handles import close_loop_handle, loop_handle
    from cluster.serving.router import GptossRouter

    handle = ray_serving.handle
    before = {item: unavailable_count(item) for item in (
        "DeploymentHandle._router._asyncio_router", "AsyncioRouter.request_router", "RequestRouter._deployment_id",
        "router long-poll clients")}

    async def body():
        own = loop_handle(handle)
        await own.model_info.remote()  # the router exists once a call went through
        deadline = asyncio.get_running_loop().time() + 30
        router = serve_internals.request_router(own)
        while router is None and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.1)
            router = serve_internals.request_router(own)
        counts = await serve_internals.ReplicaCounts(handle.app_name, handle.deployment_name).read(timeout_s=30)
        await close_loop_handle(own)
        return router, counts

    router, (target, running) = asyncio.run(body())
    assert isinstance(router, GptossRouter)
    assert serve_internals.router_deployment(router) == (handle.app_name, handle.deployment_name)
    assert target >= 1 and running >= 1
    assert {item: unavailable_count(item) for item in before} == before
