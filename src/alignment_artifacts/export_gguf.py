"""``export --format gguf``: the GGUF file a model was loaded from, with directional ablation baked in.

The source file is copied: every metadata field, and every tensor byte for byte, except the ones
the ablation changes (the token embedding when layer 0 is targeted, each hooked layer's attention
output and FFN down projection, and their biases). Those are dequantized, orthogonalised against
the direction exactly as the ``hf`` export does, and quantized again in the source's type where
the installed ``gguf`` package can write it, else in a fallback (Q8_0). If the output head is
tied to the token embedding, the head keeps the original matrix as its own ``output.weight``.
The export manifest is stored as JSON under the metadata key ``alignment_artifacts.export``.

GGUF stores a matrix that llama.cpp multiplies as ``W x`` with numpy shape [out, in] (ggml's
``ne = [in, out]``), and embeddings as [rows, hidden], whatever layout the original checkpoint had.

Models loaded from Hugging Face folders are refused: a loadable GGUF needs llama.cpp's converter
(tokenizer pre-processing, per-family hyperparameters and weight permutations).
"""

from __future__ import annotations

import functools
import hashlib
import json
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .analysis.directions import DirectionSet
from .bake import bake_plan
from .cache import atomic_file
from .errors import UserError, closest
from .export import check_target, export_manifest
from .steering import Steering
from .steering.modes import WeightEdit
from .steering.weights import write_direction

MANIFEST_KEY = "alignment_artifacts.export"
FALLBACK_TYPE = "Q8_0"
CHUNK_ROWS = 8192  # embedding rows dequantized at a time, so a large vocabulary needs little memory


@dataclass(frozen=True)
class Edit:
    """One tensor to rewrite by the mode's weight edit (``ablate``: lose ``scale`` times its part along unit ``u``)."""

    name: str  # GGUF tensor name
    source: str  # the Hugging Face parameter it corresponds to
    u: np.ndarray
    scale: float
    kind: str  # rows ([n, hidden] embeddings) | columns ([hidden, in] projections) | bias ([hidden])
    bake: WeightEdit  # the mode's edit of each vector written (hidden units last), as the hf export uses


@functools.cache
def writable_types() -> tuple[str, ...]:
    """GGML types the installed ``gguf`` package can quantize to (it can read many more)."""
    import gguf

    names = []
    for qtype in gguf.GGMLQuantizationType:
        try:
            gguf.quants.quantize(np.zeros((1, 256), dtype=np.float32), qtype)
        except (NotImplementedError, ValueError):
            continue
        names.append(qtype.name)
    return tuple(names)


def source_gguf(loaded: Any) -> Path:
    """The GGUF file ``loaded`` was dequantized from; refuses models that did not come from one."""
    from .models.builtin import get_builtin, gguf_path
    from .models.loading import _gguf_cache_folder

    info = loaded.info
    if info.kind == "builtin":
        return gguf_path(get_builtin(info.name))
    if info.kind == "gguf":
        path = Path(json.loads((Path(info.source) / "alignment_artifacts.json").read_text())["gguf"])
        if not path.is_file() or _gguf_cache_folder(path) != Path(info.source):
            raise UserError(f"{path}, the GGUF file {info.name} was loaded from, is gone or has changed since it "
                            "was loaded. Load it again (--model path/to/file.gguf) and export again.")
        return path
    raise UserError(f"export --format gguf rewrites the GGUF file a model was loaded from, but {info.name} was "
                    f"loaded from a {info.kind} ({info.source}). A loadable GGUF of a Hugging Face model needs "
                    "llama.cpp's converter (tokenizer and per-family metadata), which this package does not "
                    "reimplement. Export --format hf, then convert that folder with llama.cpp's "
                    "`python convert_hf_to_gguf.py FOLDER --outtype q8_0`; or load the model from its .gguf file "
                    "(--model path/to/model.gguf) and export --format gguf again.")


def _architecture(reader: Any, n_layers: int) -> Any:
    import gguf

    arch_name = reader.fields["general.architecture"].contents()
    by_name = {name: arch for arch, name in gguf.MODEL_ARCH_NAMES.items()}
    if arch_name not in by_name:
        raise UserError(f"This GGUF's architecture '{arch_name}' is unknown to the installed gguf package "
                        f"({gguf.__name__}); upgrade it (pip install -U gguf) or export --format hf.")
    blocks = reader.fields.get(f"{arch_name}.block_count")
    if blocks is not None and blocks.contents() != n_layers:
        raise UserError(f"The GGUF file has {blocks.contents()} blocks but the loaded model has {n_layers}; "
                        "they are not the same model. Load the model from this file and export again.")
    return by_name[arch_name]


def _edits(loaded: Any, steering: Steering, tensors: dict[str, Any], arch: Any) -> list[Edit]:
    """The GGUF tensors the ablation changes, through gguf's Hugging Face -> GGUF name map."""
    import gguf

    adapter = loaded.adapter
    names = gguf.get_tensor_name_map(arch, adapter.n_layers)
    edits = []
    directions, bake = steering.require_directions(), steering.spec.bake
    assert bake is not None, steering.config.mode
    for term in bake_plan(steering, adapter):
        site, layer, scale = term.site, term.layer, term.s
        u = write_direction(adapter, site, layer, directions.unit(term.source)).float().numpy()
        for writer in adapter.writers(site, layer):
            kind = "rows" if site == "resid_pre" else "bias" if writer.tensor.dim() == 1 else "columns"
            name = names.get_name(writer.name, try_suffixes=(".weight", ".bias"))
            tensor = tensors.get(name) if name else None
            if writer.tensor.dim() > 2 or name is None or tensor is None or not _fits(tensor, kind,
                                                                                       adapter.hidden_size):
                raise UserError(f"{writer.name} has no matching tensor in this GGUF file (looked for "
                                f"{name or 'a mapped name'}, a {kind} tensor of width {adapter.hidden_size}), "
                                "so its ablation cannot be baked here (experts stored merged, or a layout "
                                "this writer does not know). Export --format hf, or --format vectors.")
            edits.append(Edit(name, writer.name, u, scale, kind, bake))
    return edits


def _fits(tensor: Any, kind: str, hidden: int) -> bool:
    shape = [int(n) for n in reversed(tensor.shape.tolist())]  # numpy order
    if kind == "bias":
        return shape == [hidden]
    return len(shape) == 2 and shape[1 if kind == "rows" else 0] == hidden


def _target_type(tensor: Any, gguf_type: str) -> Any:
    """The type a rewritten tensor is written in: the source's where writable, else the fallback."""
    import gguf

    if gguf_type != "auto":
        qtype = gguf.GGMLQuantizationType[gguf_type]
    elif tensor.tensor_type.name in writable_types():
        return tensor.tensor_type
    else:
        qtype = gguf.GGMLQuantizationType[FALLBACK_TYPE]
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if int(tensor.shape[0]) % block:
        if gguf_type != "auto":
            raise UserError(f"{tensor.name} has rows of {int(tensor.shape[0])} values, not a multiple of "
                            f"{qtype.name}'s block of {block}. Choose another --gguf-type (F16 always fits).")
        return gguf.GGMLQuantizationType.F16
    return qtype


def _rewrite(tensor: Any, edit: Edit, qtype: Any) -> tuple[np.ndarray, float]:
    """The edited tensor in ``qtype``, and its requantization error (relative RMS against exact)."""
    from gguf.quants import dequantize, quantize

    u = torch.from_numpy(edit.u)

    def apply(w: np.ndarray, hidden_last: bool = True) -> np.ndarray:
        t = torch.from_numpy(np.array(w, dtype=np.float32))  # a writable copy
        return (edit.bake(t, u, edit.scale) if hidden_last else edit.bake(t.T, u, edit.scale).T).numpy()

    if edit.kind == "rows":
        exact = [apply(dequantize(tensor.data[i:i + CHUNK_ROWS], tensor.tensor_type))
                 for i in range(0, tensor.data.shape[0], CHUNK_ROWS)]
    else:  # columns ([hidden, in]) or a bias ([hidden])
        exact = [apply(dequantize(tensor.data, tensor.tensor_type), edit.kind == "bias")]
    written = [quantize(np.ascontiguousarray(w, dtype=np.float32), qtype) for w in exact]
    error = sum(float(np.square(dequantize(q, qtype).reshape(w.shape) - w).sum()) for q, w in zip(written, exact))
    size = sum(float(np.square(w).sum()) for w in exact)
    return np.concatenate(written), (error / max(size, 1e-30)) ** 0.5


def _copy_fields(reader: Any, writer: Any) -> None:
    """Every metadata field of the source, with its exact value types."""
    import gguf

    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == gguf.Keys.General.ARCHITECTURE:
            continue
        if key == gguf.Keys.General.ALIGNMENT:
            writer.add_custom_alignment(int(field.contents()))
            continue
        types = field.types
        if len(types) > 2:
            raise UserError(f"Metadata field {key} is a nested array, which this writer cannot copy; "
                            "export --format hf instead.")
        sub_type = types[1] if types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), types[0], sub_type=sub_type)


def directions_sha256(directions: DirectionSet) -> str:
    """Hash of the direction vectors themselves (float32, by layer), which the metadata alone does not pin."""
    digest = hashlib.sha256()
    for layer in directions.layers:
        digest.update(f"{layer}:".encode() + directions.vectors[layer].float().numpy().tobytes())
    return digest.hexdigest()


def export_gguf(loaded: Any, steering: Steering, out: Path, force: bool, evaluation: dict[str, Any] | None,
                gguf_type: str = "auto") -> Path:
    """Write ``out`` (a .gguf file): the source GGUF with the ablation baked in; returns ``out``."""
    import gguf

    config, directions = steering.config, steering.require_directions()
    if gguf_type != "auto" and gguf_type not in writable_types():
        raise UserError(f"The installed gguf package cannot write {gguf_type} tensors."
                        f"{closest(gguf_type, writable_types())} Writable: {', '.join(writable_types())}, or auto "
                        f"(each tensor in the source's type where writable, else {FALLBACK_TYPE}).")
    if out.suffix != ".gguf":
        raise UserError(f"--format gguf writes one file; give --out a path ending in .gguf (got {out}).")
    bake_plan(steering, loaded.adapter)  # refuse modes and sites before reading gigabytes
    source = source_gguf(loaded)
    check_target(out, force, folder=False)
    reader = gguf.GGUFReader(source)
    if reader.byte_order != "I":
        raise UserError(f"{source} is stored in the other byte order than this machine's; convert it with "
                        "llama.cpp's gguf tools first, or export --format hf.")
    arch = _architecture(reader, loaded.adapter.n_layers)
    tensors = {t.name: t for t in reader.tensors}
    edits = _edits(loaded, steering, tensors, arch)
    untie = any(e.name == "token_embd.weight" for e in edits) and "output.weight" not in tensors
    if untie and gguf.MODEL_TENSOR.OUTPUT not in gguf.MODEL_TENSORS[arch]:
        raise UserError(f"llama.cpp's {gguf.MODEL_ARCH_NAMES[arch]} always uses the token embedding as its "
                        "output head, so baking layer 0 (which edits the embedding) would change the head too. "
                        "Leave layer 0 out (--layers 1,2,...), or export --format hf.")
    notes, exact = [], loaded.adapter.bake_is_exact or steering.spec.in_weights  # a weights-only mode is its bake
    if not exact:
        notes.append(f"Approximate: {loaded.adapter.model_type} normalises after each output projection, so "
                     "orthogonalising the projections does not remove the direction exactly.")
        warnings.warn(notes[-1], stacklevel=3)
    by_name = {e.name: e for e in edits}
    targets = {name: _target_type(tensors[name], gguf_type) for name in by_name}
    written: dict[str, np.ndarray] = {}
    errors: dict[str, float] = {}
    for name, edit in by_name.items():
        written[name], errors[name] = _rewrite(tensors[name], edit, targets[name])
    manifest = export_manifest(loaded, config, directions, "gguf", evaluation, exact=exact,
                         warnings=notes, source_gguf=str(source), gguf_type=gguf_type,
                         directions_sha256=directions_sha256(directions),
                         modified={name: {"from": edit.source, "source_type": tensors[name].tensor_type.name,
                                          "written_type": targets[name].name,
                                          "requantization_rms_error": round(errors[name], 6)}
                                   for name, edit in by_name.items()},
                         output_head_untied=untie)
    with atomic_file(out) as tmp:
        writer = gguf.GGUFWriter(str(tmp), gguf.MODEL_ARCH_NAMES[arch])
        _copy_fields(reader, writer)
        writer.add_string(MANIFEST_KEY, json.dumps(manifest, default=str))
        for tensor in reader.tensors:
            if tensor.name in written:
                writer.add_tensor(tensor.name, written[tensor.name], raw_dtype=targets[tensor.name])
            else:
                writer.add_tensor(tensor.name, tensor.data, raw_dtype=tensor.tensor_type)
        if untie:  # the head keeps the original embedding
            head = tensors["token_embd.weight"]
            writer.add_tensor("output.weight", head.data, raw_dtype=head.tensor_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return out


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The export manifest stored in a GGUF written by :func:`export_gguf`."""
    import gguf

    field = gguf.GGUFReader(path).fields.get(MANIFEST_KEY)
    if field is None:
        raise UserError(f"{path} has no {MANIFEST_KEY} metadata: it was not written by export --format gguf.")
    return json.loads(field.contents())


@contextmanager
def llama_cpp_without_repacking() -> Iterator[Any]:
    """llama-cpp-python with llama.cpp's weight repacking off while the block runs (yields ``llama_cpp``).

    Repacking into AMX tiles segfaults on some Sapphire Rapids hosts (ggml-org/llama.cpp#20824),
    and llama-cpp-python has no switch for it (llama.cpp's ``--no-repack``), so the model parameters
    are built with ``use_extra_bufts`` off. Models loaded inside the block keep the setting.
    """
    try:
        import llama_cpp
        import llama_cpp.llama as llama_module
    except ImportError:
        raise UserError("Checking a GGUF export needs llama-cpp-python: pip install 'alignment-artifacts[llama]' "
                        "(it compiles llama.cpp: several minutes).") from None
    defaults = llama_cpp.llama_model_default_params

    def no_repacking() -> Any:
        params = defaults()
        params.use_extra_bufts = False
        return params

    llama_module.llama_cpp.llama_model_default_params = no_repacking
    try:
        yield llama_cpp
    finally:
        llama_module.llama_cpp.llama_model_default_params = defaults


def open_llama_cpp(path: str | Path, **options: Any) -> Any:
    """A GGUF loaded in llama-cpp-python for checking an export, repacking off (see above). ``options``
    go to ``llama_cpp.Llama`` (defaults: a 512-token context, logits at every position, quiet, seed 0)."""
    with llama_cpp_without_repacking() as llama_cpp:
        return llama_cpp.Llama(model_path=str(path), **{"n_ctx": 512, "n_batch": 512, "logits_all": True,
                                                          "verbose": False, "seed": 0, **options})
