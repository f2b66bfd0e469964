"""Collectives in one place: no other module of the platform calls torch.distributed's collectives, and the
one module puts tensors on the process group's device (CUDA for NCCL, CPU for gloo)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import rmoe_platform
from rmoe_platform.stage.worker import collectives

PACKAGE = Path(rmoe_platform.__file__).parent
HOME = PACKAGE / "stage" / "worker" / "collectives.py"
# torch.distributed's collectives and point-to-point calls (and the group factory they need)
COLLECTIVES = {
    "all_reduce",
    "all_reduce_coalesced",
    "all_gather",
    "all_gather_into_tensor",
    "all_gather_object",
    "all_to_all",
    "all_to_all_single",
    "broadcast",
    "broadcast_object_list",
    "reduce",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "gather",
    "gather_object",
    "scatter",
    "scatter_object_list",
    "barrier",
    "monitored_barrier",
    "send",
    "recv",
    "isend",
    "irecv",
    "batch_isend_irecv",
    "new_group",
}
DISTRIBUTED_MODULES = ("torch.distributed", "torch.distributed.nn", "torch.distributed.nn.functional")


def direct_collective_calls(path: Path) -> list[str]:
    """`dist.all_reduce(...)`-style calls on a name bound to a torch.distributed module, and collectives
    imported by name from one, in `path`."""
    tree = ast.parse(path.read_text(), filename=str(path))
    aliases: set[str] = set()
    found: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("torch.distributed"):
                    aliases.add(alias.asname or alias.name)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("torch.distributed"):
            for alias in node.names:
                if alias.name in COLLECTIVES:
                    found.append(f"{path.name}:{node.lineno} imports {alias.name}")
                if f"{node.module}.{alias.name}" in DISTRIBUTED_MODULES or alias.name in ("distributed", "nn"):
                    aliases.add(alias.asname or alias.name)
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in COLLECTIVES:
            owner = ast.unparse(node.func.value)
            if owner in aliases or owner.startswith("torch.distributed"):
                found.append(f"{path.name}:{node.lineno} {owner}.{node.func.attr}")
    return found


def test_no_module_but_collectives_calls_a_collective() -> None:
    offenders = {
        str(path.relative_to(PACKAGE)): calls
        for path in sorted(PACKAGE.rglob("*.py"))
        if path != HOME and (calls := direct_collective_calls(path))
    }
    assert offenders == {}


def test_the_check_finds_direct_calls(tmp_path: Path) -> None:
    """The AST check is not vacuous: each spelling of a direct collective is caught."""
    sample = tmp_path / "sample.py"
    sample.write_text(
        "import torch\n"
        "import torch.distributed as dist\n"
        "import torch.distributed.nn.functional as fn\n"
        "from torch.distributed import all_gather_object\n"
        "dist.all_reduce(x)\n"
        "fn.all_to_all_single(a, b)\n"
        "torch.distributed.barrier()\n"
        "dist.get_rank()\n"
    )
    calls = direct_collective_calls(sample)
    assert calls == [
        "sample.py:4 imports all_gather_object",
        "sample.py:5 dist.all_reduce",
        "sample.py:6 fn.all_to_all_single",
        "sample.py:7 torch.distributed.barrier",
    ]
    assert direct_collective_calls(HOME), "the collectives module itself is where the calls are"


@pytest.mark.parametrize(
    ("backend", "device"),
    [("nccl", torch.device("cuda", 3)), ("gloo", torch.device("cpu")), ("cpu:gloo,cuda:nccl", torch.device("cpu"))],
)
def test_the_group_backend_decides_the_device(monkeypatch, backend: str, device: torch.device) -> None:
    monkeypatch.setattr(dist, "get_backend", lambda group=None: backend)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert collectives.comm_device() == device


class Recorded:
    """Stands in for torch.distributed in a world of 2: records where each collective's tensor lives."""

    def __init__(self, monkeypatch, backend: str) -> None:
        self.moves: list[torch.device] = []
        self.calls: list[tuple[str, str]] = []
        monkeypatch.setattr(collectives, "is_distributed", lambda: True)
        monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
        monkeypatch.setattr(dist, "get_backend", lambda group=None: backend)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
        real_to = torch.Tensor.to
        recorded = self

        def to(tensor: torch.Tensor, *args, **kwargs):  # CUDA is absent here: record the move, stay on CPU
            target = args[0] if args else kwargs.get("device")
            if isinstance(target, torch.device):
                recorded.moves.append(target)
                return tensor.clone()
            return real_to(tensor, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, "to", to)
        monkeypatch.setattr(dist, "all_reduce", self._all_reduce)

    def _all_reduce(self, tensor: torch.Tensor, op=None, group=None) -> None:
        self.calls.append(("all_reduce", str(self.moves[-1]) if self.moves else "in place"))
        tensor.mul_(2)  # the other rank holds the same values


def test_an_nccl_group_gets_cuda_tensors_and_the_caller_its_own_device_back(monkeypatch) -> None:
    recorded = Recorded(monkeypatch, "nccl")
    totals = torch.tensor([1.0, 2.0], dtype=torch.float64)
    out = collectives.all_reduce(totals)
    assert recorded.calls == [("all_reduce", "cuda:1")]
    assert recorded.moves == [torch.device("cuda", 1), torch.device("cpu")], "to the group's device and back"
    assert out.tolist() == [2.0, 4.0]


def test_a_gloo_group_reduces_cpu_tensors_in_place(monkeypatch) -> None:
    recorded = Recorded(monkeypatch, "gloo")
    totals = torch.tensor([1.0, 2.0])
    out = collectives.all_reduce(totals, op="avg")
    assert recorded.moves == [] and recorded.calls == [("all_reduce", "in place")]
    assert out is totals and out.tolist() == [1.0, 2.0]


def test_one_process_is_a_world_of_one() -> None:
    assert not collectives.is_distributed()
    tensor = torch.arange(3.0)
    assert collectives.all_reduce(tensor) is tensor
    assert torch.equal(collectives.all_gather_cat(tensor), tensor)
    assert collectives.all_gather_objects({"a": 1}) == [{"a": 1}]
    assert (collectives.world_size(), collectives.rank()) == (1, 0)
