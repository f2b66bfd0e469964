"""An imported dense core: the upstream stage of the dense-based pipelines, read from a pretrained model
(`upstream.checkpoint`) instead of trained.

`inspect_core` runs on the driver while the experiment is validated (nothing is written): it reads the
file (local or S3), hashes its content, and checks every key and shape against the experiment's dense
architecture. The stage graph keys the imported node by that content hash, so its descendants are cached
like any stage's. `materialize_core` then writes the core once as a platform checkpoint (the spec that
rebuilds it embedded, a classifier of the upstream class count) under the experiment's storage, where
the child stages load it exactly as they load a trained parent.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from rmoe import ModelSpec, save_model
from rmoe.core_import import DenseCore, import_dense_core
from rmoe_platform import storage
from rmoe_platform.config.experiment import ExperimentConfig
from rmoe_platform.config.fields import ConfigError
from rmoe_platform.pipelines.accounting import Cost, declared_cost
from rmoe_platform.storage.s3 import S3Access, explain_error

FIELD = "experiment.upstream.checkpoint"
MODEL_FILE = "model.safetensors"


@dataclass(frozen=True)
class ImportedCore:
    """What the driver found in `upstream.checkpoint`, and what the imported stage charges."""

    uri: str  # as configured (a file, or a platform checkpoint folder holding model.safetensors)
    sha256: str  # of the file's bytes
    file_format: str  # safetensors | torch | rmoe
    file_classes: int  # the file's classifier outputs (0: none)
    spec: ModelSpec  # the core as the child stages load it (num_classes after any head re-initialisation)
    head_reinitialized: bool
    cost: Cost  # declared, never measured
    seed: int  # seeds a re-initialised head

    @property
    def identity(self) -> str:
        """The stage cache's key: the file's content and what the import makes of it."""
        payload = {"sha256": self.sha256, "spec": self.spec.to_dict()}
        if self.head_reinitialized:
            payload["head_seed"] = self.seed
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]

    def describe(self) -> dict[str, Any]:
        """The import as the stage row's config records it."""
        return {
            "uri": self.uri,
            "sha256": self.sha256,
            "format": self.file_format,
            "file_classes": self.file_classes,
            "num_classes": self.spec.model_kwargs.get("num_classes"),
            "head_reinitialized": self.head_reinitialized,
            "declared_gpu_days": self.cost.gpu_days,
            "declared_dollars": self.cost.dollars,
            "declared_flops": self.cost.flops,
        }

    def summary(self) -> str:
        """One line for the closing report."""
        head = f"{self.file_classes} classes"
        if self.head_reinitialized:
            head += f", head re-initialised for {self.spec.model_kwargs.get('num_classes')}"
        sunk = " (sunk)" if self.cost.gpu_seconds == 0 and self.cost.dollars == 0 else ""
        return (
            f"imported core {self.uri} ({self.file_format}, sha256 {self.sha256[:12]}, {head}); "
            f"declared cost {self.cost.gpu_days:g} GPU-days, ${self.cost.dollars:.2f}{sunk}"
        )


def inspect_core(exp: ExperimentConfig, access: S3Access, num_classes: int | None) -> ImportedCore:
    """Read and check `upstream.checkpoint` against the experiment's dense arch; raises ConfigError naming
    the file and the problem. `num_classes`: the upstream data's classes (a different head is re-initialised)."""
    uri = exp.upstream.checkpoint
    assert uri is not None
    with tempfile.TemporaryDirectory() as tmp:
        local = _fetch(uri, Path(tmp), access)
        core = _load(uri, local, exp, num_classes)
        digest = _sha256(local)
    declared = exp.upstream.declared_cost
    cost = declared_cost(declared.gpu_days, declared.dollars, declared.flops, exp.prices)
    return ImportedCore(
        uri, digest, core.file_format, core.file_classes, core.spec, core.head_reinitialized, cost, exp.seed
    )


def materialize_core(core: ImportedCore, exp: ExperimentConfig, access: S3Access) -> str:
    """The platform checkpoint folder of `core` under the experiment's storage, written once (content
    addressed: a rerun, or another experiment's run from the same file, finds it)."""
    folder = storage.join(exp.storage, exp.name, "imported", core.identity)
    target = storage.join(folder, MODEL_FILE)
    if storage.exists(target, access):
        return folder
    with tempfile.TemporaryDirectory() as tmp:
        local = _fetch(core.uri, Path(tmp), access)
        if _sha256(local) != core.sha256:
            raise ConfigError(f"{FIELD}: {core.uri!r} changed since the experiment was validated")
        model = _load(core.uri, local, exp, core.spec.model_kwargs.get("num_classes")).model
        written = save_model(
            model, Path(tmp) / MODEL_FILE, metadata={"rmoe_imported_from": core.uri, "rmoe_source_sha256": core.sha256}
        )
        fs, path = storage.filesystem(target, field="experiment.storage", s3=access)
        storage.write_bytes(fs, path, written.read_bytes())  # whole or not at all
    return folder


def _load(uri: str, local: Path, exp: ExperimentConfig, num_classes: int | None) -> DenseCore:
    try:
        spec = ModelSpec(exp.arch, dict(exp.model_kwargs))
        return import_dense_core(local, spec, num_classes=num_classes, seed=exp.seed)
    except ValueError as err:
        raise ConfigError(f"{FIELD}: {str(err).replace(str(local), uri)}") from None


def _fetch(uri: str, tmp: Path, access: S3Access) -> Path:
    """The file behind `uri` on local disk (S3 objects copied under `tmp`); a folder means its model file."""
    fs, path = storage.filesystem(uri, field=FIELD, s3=access)
    try:
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.Directory:
            uri, path, info = f"{uri.rstrip('/')}/{MODEL_FILE}", f"{path.rstrip('/')}/{MODEL_FILE}", None
            info = fs.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            raise ConfigError(f"{FIELD}: no such file {uri!r}")
        if not storage.is_remote(uri):
            return Path(path)
        target = tmp / Path(path).name
        pafs.copy_files(path, str(target), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    except OSError as err:
        raise ConfigError(f"{FIELD}: cannot read {explain_error(err, uri, access)}") from None
    return target


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
