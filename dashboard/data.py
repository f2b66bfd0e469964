"""Cached loading: the store handle (S3 access and filesystem) once per process, the rows for a minute,
checkpoint analyses for ten. Every failure becomes a `LoadError` with a message fit for the page."""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd
import pyarrow.fs as pafs
import streamlit as st

from dashboard import checkpoints, experts, processing
from rmoe_platform import storage
from rmoe_platform.config.fields import ConfigError
from rmoe_platform.results import ResultsStore
from rmoe_platform.storage.s3 import S3Access, S3Options

ROWS_TTL_S = 60
CHECKPOINT_TTL_S = 600


class LoadError(Exception):
    """Something the page reports as a message (never a traceback)."""


@dataclass
class Loaded:
    uri: str
    exists: bool
    frame: pd.DataFrame
    skipped: list[str] = field(default_factory=list)  # files the store could not parse
    warnings: list[str] = field(default_factory=list)  # rows with unreadable fields


@st.cache_resource(show_spinner=False)
def s3_access() -> S3Access:
    """S3 endpoint and credentials from the environment (AWS_* variables or a profile), resolved once."""
    return S3Access.resolve(S3Options())


@st.cache_resource(show_spinner=False)
def results_store(uri: str) -> ResultsStore:
    return ResultsStore(uri, s3=s3_access() if storage.is_remote(uri) else None)


@st.cache_data(ttl=ROWS_TTL_S, show_spinner="Reading the results store …")
def load_results(uri: str) -> Loaded:
    try:
        store = results_store(uri)
        exists = storage.exists(store.uri, store.access)
        result = store.read()
    except (ConfigError, ValueError, OSError) as err:
        raise LoadError(f"Cannot read the results store {uri!r}: {err}") from None
    parsed = processing.parse_rows(result.table)
    return Loaded(store.uri, exists, parsed.frame, list(result.skipped), parsed.warnings)


@dataclass
class ExpertAnalysis:
    ratios: pd.DataFrame
    pca: pd.DataFrame


@st.cache_data(ttl=CHECKPOINT_TTL_S, max_entries=16, show_spinner="Reading expert weights …")
def expert_analysis(checkpoint_uri: str, parent_uris: tuple[str, ...] = ()) -> ExpertAnalysis:
    """Norm ratios and PCA of a checkpoint's experts; the first of `parent_uris` (its ancestors, nearest
    first) holding dense MLPs for the MoE layers serves as the core of plain (upcycled) experts."""
    try:
        tensors = checkpoints.expert_tensors(*_fs(checkpoints.model_path(checkpoint_uri)))
    except (ConfigError, ValueError, OSError, KeyError) as err:
        raise LoadError(f"Cannot read the expert weights of {checkpoint_uri!r}: {err}") from None
    weights = [found for k in tensors if (found := checkpoints.expert_weight(k)) is not None]
    layer_names = sorted({found.layer for found in weights})
    parent: dict = {}
    if any(found.role == "expert" for found in weights):  # plain experts: look for the dense parent
        for uri in parent_uris:
            try:
                parent = checkpoints.dense_mlp_tensors(*_fs(checkpoints.model_path(uri)), layer_names)
            except (ConfigError, ValueError, OSError, KeyError):
                continue  # an ancestor's checkpoint that is gone only costs the dense reference
            if parent:
                break
    layers = experts.layer_experts(tensors, parent)
    return ExpertAnalysis(experts.norm_ratios(layers), experts.pca_around_core(layers))


def _fs(uri: str) -> tuple[pafs.FileSystem, str]:
    return storage.filesystem(uri, field="checkpoint", s3=s3_access() if storage.is_remote(uri) else None)


def clear() -> None:
    load_results.clear()
    expert_analysis.clear()
