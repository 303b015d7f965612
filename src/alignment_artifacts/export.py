"""Export a steering intervention so that it runs without this package.

Three formats (see docs/export.md):

``hf``
    Directional ablation baked into a copy of the weights: every matrix that writes into the
    residual stream at a hooked site is orthogonalised against the direction, so plain
    transformers (or vLLM, or any HF-compatible server) reproduces ``mode='ablate'``
    (:mod:`alignment_artifacts.bake`).
``gguf``
    The same baked ablation as a whole GGUF model, rewritten from the GGUF file the model was
    loaded from (:mod:`alignment_artifacts.export_gguf`).
``gguf-control-vector``
    The additive modes (``always``, ``amplify``) as a llama.cpp control vector.
``vectors``
    Directions plus the configuration, for :func:`load_steering` and ``Steering.apply``.

Every export is written into a temporary sibling that is renamed into place, so an interrupted
export (disk full, crash) never leaves something that looks complete.
"""

from __future__ import annotations

import datetime
import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from .analysis.directions import DirectionSet
from .bake import bake_ablation, bake_error, bake_plan
from .cache import atomic_directory, atomic_file, atomic_save_safetensors, atomic_write_bytes, atomic_write_json
from .errors import UserError, closest
from .steering import Steering, SteeringConfig

FORMATS = ("hf", "gguf", "gguf-control-vector", "vectors")
EXPORT_MANIFEST = "alignment_artifacts_export.json"
STEERING_FILE = "steering.json"
CONTROL_VECTOR_FILE = "control_vector.gguf"
CONTROL_VECTOR_ARCH = "controlvector"
EXPORT_VERSION = 1
MEMORY_NOTE = ("Baking copies the model: peak memory is about twice the loaded model (2x the float32 size "
               "for a float32 model), plus one float32 matrix at a time for the arithmetic.")


def export(loaded: Any, steering: Steering, out: str | Path, format: str = "hf", force: bool = False,
           evaluation: dict[str, Any] | None = None, gguf_type: str = "auto") -> Path:
    """Write ``steering`` (configuration and directions) for ``loaded`` to ``out`` in ``format``; returns
    what was written.

    The caller's model is never modified. ``gguf_type`` (format ``gguf`` only) is the type of the
    rewritten tensors: ``auto`` keeps the source's.
    """
    if format not in FORMATS:
        raise UserError(f"Unknown export format '{format}'.{closest(format, FORMATS)} Formats: "
                        f"{', '.join(FORMATS)}.")
    adapter = loaded.adapter
    steering.config.validate(adapter.n_layers)
    if steering.directions is not None:
        steering.directions.check_compatible(adapter.hidden_size, loaded.info.weights_hash, loaded.info.name)
    out = Path(out).expanduser()
    if gguf_type != "auto" and format != "gguf":
        raise UserError(f"--gguf-type applies to --format gguf only (this export is --format {format}).")
    if format == "gguf":
        from .export_gguf import export_gguf

        return export_gguf(loaded, steering, out, force, evaluation, gguf_type)
    if format == "hf":
        return _export_hf(loaded, steering, out, force, evaluation)
    if format == "gguf-control-vector":
        return _export_control_vector(loaded, steering, out, force, evaluation)
    return _export_vectors(loaded, steering, out, force, evaluation)


# Shared pieces ------------------------------------------------------------------------------

def check_target(out: Path, force: bool, folder: bool = True) -> None:
    """Refuse to replace an existing export unless asked, or to replace a file by a folder (or back)."""
    if not out.exists():
        return
    if not force:
        raise UserError(f"{out} already exists. Choose another output path, or pass force=True (--force) to "
                        "replace it.")
    if out.is_dir() != folder:
        have, want = ("folder" if out.is_dir() else "file"), ("folder" if folder else "file")
        raise UserError(f"{out} exists and is a {have}, but this export writes a {want}. Remove it or "
                        "choose another path.")


def export_manifest(loaded: Any, config: SteeringConfig, directions: DirectionSet, format: str,
              evaluation: dict[str, Any] | None, **extra: Any) -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        package_version = version("alignment-artifacts")
    except PackageNotFoundError:
        package_version = "unknown"
    return {"export_version": EXPORT_VERSION, "format": format, "package_version": package_version,
            "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "base_model": loaded.info.to_json(), "steering": config.to_json(),
            "directions": directions.metadata(), "evaluation": evaluation, **extra}


def _direction_summary(config: SteeringConfig, directions: DirectionSet) -> str:
    layer = ("each layer's own direction" if config.direction_layer is None
             else f"layer {config.direction_layer}'s direction at every layer")
    prompt_set = directions.extra.get("prompt_set_name") or directions.source
    return (f"difference of {directions.method}s at site `{directions.site}`, position "
            f"`{directions.position}`, from prompt set `{prompt_set}` "
            f"({directions.n_positive} sensitive vs {directions.n_negative} ordinary prompts, hash "
            f"`{directions.prompt_set_hash or 'n/a'}`); {layer}")


def _evaluation_lines(evaluation: dict[str, Any] | None) -> list[str]:
    if not evaluation:
        return ["No evaluation numbers were supplied with this export."]
    return ["| metric | value |", "| --- | --- |", *(f"| {k} | {v} |" for k, v in evaluation.items())]


def _write_card(folder: Path, title: str, manifest: dict[str, Any], body: list[str]) -> None:
    info = manifest["base_model"]
    front = ["---", "tags:", "- alignment-artifacts", "- steering"]
    if info.get("kind") == "hub":
        front += [f"base_model: {info['source']}"]
    lines = [*front, "---", "", f"# {title}", "", *body, "", "## Evaluation", "",
             *_evaluation_lines(manifest.get("evaluation")), "", "## Steering configuration", "", "```json",
             json.dumps(manifest["steering"], indent=2, default=str), "```", "",
             "## Direction metadata", "", "```json",
             json.dumps(manifest["directions"], indent=2, default=str), "```", "",
             f"Made with alignment-artifacts {manifest['package_version']} on {manifest['created']}.", ""]
    atomic_write_bytes(folder / "README.md", "\n".join(lines).encode())


# hf: ablation baked into weights (bake.py) -----------------------------------------------------

def _export_hf(loaded: Any, steering: Steering, out: Path, force: bool, evaluation: dict[str, Any] | None) -> Path:
    config, directions = steering.config, steering.require_directions()
    bake_plan(steering, loaded.adapter)  # refuse before copying gigabytes
    check_target(out, force)
    baked, changed = bake_ablation(loaded, steering)
    notes, exact = [], loaded.adapter.bake_is_exact or steering.spec.in_weights  # a weights-only mode is its bake
    if not exact:
        norms = ", ".join(loaded.adapter.spec.post_norms)
        notes.append(f"Approximate: {loaded.adapter.model_type} applies a norm after each output projection "
                     f"({norms}). The projections were made orthogonal to the norm's gain times the direction, "
                     "so at scale 1 no component along the direction reaches the residual stream, but the norm "
                     "rescales the rest: logits differ from the hooked model (see bake_check).")
        warnings.warn(notes[-1], stacklevel=3)
    check = bake_error(loaded, baked, steering)
    manifest = export_manifest(loaded, config, directions, "hf", evaluation, exact=exact,
                         warnings=notes, bake_check=check, modified=changed, memory_note=MEMORY_NOTE)
    body = [f"`{loaded.info.name}` with directional ablation baked into its weights by "
            "alignment-artifacts.", "",
            f"- Base model: `{loaded.info.name}` ({loaded.info.model_type}, {loaded.info.n_layers} layers, "
            f"weights `{loaded.info.weights_hash}`, source `{loaded.info.source}`)",
            f"- Direction: {_direction_summary(config, directions)}",
            f"- Intervention: `{config.mode}` ({steering.spec.summary}), scale {config.scale}, {len(changed)} "
            "residual-writing tensors edited",
            f"- Agreement with the hooked model: max |logit diff| {check['max_abs_logit_diff']:.3g} "
            f"(relative {check['relative']:.3g})",
            *(f"- **Warning:** {note}" for note in notes), "", "## How it was made", "",
            "For unit direction u and scale s, every matrix that writes into the residual stream at a hooked "
            "site was replaced so its output loses s times its component along u: embeddings "
            "E' = E - s(Eu)u^T (only when layer 0 is targeted), linear projections W' = W - s u(u^T W) and "
            "b' = b - s u(u.b); in mixture-of-experts blocks every expert's down projection and bias, and the "
            "shared experts', the router untouched. "
            "Mode 'ablate_weight_norm' then rescales each vector written (each column, embedding row or bias) "
            "back to its norm before the edit. "
            f"This equals `Steering(config, directions).apply(model)` (mode '{config.mode}') with the "
            "configuration below.", "",
            f"Memory: {MEMORY_NOTE}", "", "## Usage", "", "```python",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "model = AutoModelForCausalLM.from_pretrained(PATH)",
            "tokenizer = AutoTokenizer.from_pretrained(PATH)",
            "```", "", "or `vllm serve PATH`."]
    with atomic_directory(out, overwrite=force) as tmp:
        baked.save_pretrained(tmp)
        loaded.tokenizer.save_pretrained(tmp)
        atomic_write_json(tmp / EXPORT_MANIFEST, manifest)
        _write_card(tmp, f"{loaded.info.name} (ablated)", manifest, body)
    del baked
    return out


# gguf-control-vector ----------------------------------------------------------------------------

def control_vector_index(site: str, layer: int) -> int:
    """The llama.cpp ``direction.N`` index that adds a constant vector where a hook at (site, layer) does.

    llama.cpp adds ``direction.N`` to the output of 0-based block N (``build_cvec(cur, il)`` after the
    block's last residual add; the loader puts ``direction.N`` at data offset (N-1)*n_embd, which
    ``llama_adapter_cvec::apply`` copies into ``tensors[N]``). A constant added to mlp_out or
    resid_post of block L reaches the residual stream at block L's output; resid_pre of block L is
    block L-1's output. ``direction.0`` does not exist (llama.cpp rejects it).
    """
    if site == "attn_out":
        raise UserError("A control vector cannot reproduce steering at site attn_out: the vector lands in "
                        "the middle of the block, where the MLP reads it, while llama.cpp adds control "
                        "vectors only to block outputs. Use site mlp_out or resid_post (the same thing for a "
                        "constant vector) or export --format vectors.")
    index = layer - 1 if site == "resid_pre" else layer
    if index < 1:
        where = "the embeddings" if index < 0 else "block 0's output"
        raise UserError(f"Site {site} of layer {layer} adds to {where}, which llama.cpp control vectors "
                        "cannot reach (direction.N is added to block N's output for N >= 1). Target later "
                        "layers: mlp_out/resid_post of layer >= 1, or resid_pre of layer >= 2.")
    return index


def control_vectors(loaded: Any, steering: Steering) -> dict[int, np.ndarray]:
    """{llama.cpp layer index N: float32 vector} equal to the additive hooks of ``steering``."""
    vectors: dict[int, np.ndarray] = {}
    for term, delta in steering.control_vector(loaded.adapter.n_layers):
        index = control_vector_index(term.site, term.layer)
        vectors[index] = vectors.get(index, 0.0) + delta.numpy()
    if not vectors:
        raise UserError("This configuration adds nothing at any layer (all layer weights are 0); there is no "
                        "control vector to write.")
    return {n: vectors[n].astype(np.float32) for n in sorted(vectors)}


def _write_gguf(path: Path, vectors: dict[int, np.ndarray], model_hint: str,
                manifest: dict[str, Any]) -> None:
    """Write the control vector atomically: a temporary sibling renamed into place."""
    import gguf

    with atomic_file(path) as tmp:
        writer = gguf.GGUFWriter(str(tmp), arch=CONTROL_VECTOR_ARCH)
        writer.add_string(f"{CONTROL_VECTOR_ARCH}.model_hint", model_hint)
        writer.add_uint32(f"{CONTROL_VECTOR_ARCH}.layer_count", len(vectors))
        writer.add_string("alignment_artifacts.export", json.dumps(manifest, default=str))
        for index, vector in vectors.items():
            writer.add_tensor(f"direction.{index}", vector)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()


def _export_control_vector(loaded: Any, steering: Steering, out: Path, force: bool,
                           evaluation: dict[str, Any] | None) -> Path:
    if not steering.spec.steers:
        raise UserError(f"Mode '{steering.config.mode}' steers nothing; there is nothing to export.")
    config, directions = steering.config, steering.require_directions()
    vectors = control_vectors(loaded, steering)
    check_target(out, force, folder=out.suffix != ".gguf")
    manifest = export_manifest(loaded, config, directions, "gguf-control-vector", evaluation,
                         control_vector_layers={f"direction.{n}": f"added to the output of 0-based block {n}"
                                                for n in vectors})
    if out.suffix == ".gguf":
        _write_gguf(out, vectors, loaded.info.model_type, manifest)
        return out
    body = [f"A llama.cpp control vector for `{loaded.info.name}` ({loaded.info.model_type}), mode "
            f"`{config.mode}`, scale {config.scale}.", "",
            f"- Direction: {_direction_summary(config, directions)}",
            f"- Tensors: {', '.join(f'direction.{n}' for n in vectors)} (direction.N is added to the "
            "output of 0-based block N)", "", "## Usage", "", "```sh",
            f"llama-cli -m MODEL.gguf --control-vector-scaled {CONTROL_VECTOR_FILE} 1.0", "```"]
    with atomic_directory(out, overwrite=force) as tmp:
        _write_gguf(tmp / CONTROL_VECTOR_FILE, vectors, loaded.info.model_type, manifest)
        atomic_write_json(tmp / EXPORT_MANIFEST, manifest)
        _write_card(tmp, f"{loaded.info.name} control vector ({config.mode})", manifest, body)
    return out


def read_control_vector(path: str | Path) -> dict[str, Any]:
    """Read a control vector back: arch, model_hint, layer_count and {tensor name: float32 array}."""
    import gguf

    path = Path(path)
    if path.is_dir():
        path = path / CONTROL_VECTOR_FILE
    if not path.is_file():
        raise UserError(f"{path} does not exist; expected a .gguf control vector (or a folder holding "
                        f"{CONTROL_VECTOR_FILE}).")
    reader = gguf.GGUFReader(path)

    def value(key: str) -> Any:
        field = reader.fields.get(key)
        return None if field is None else field.contents()

    return {"arch": value("general.architecture"), "model_hint": value(f"{CONTROL_VECTOR_ARCH}.model_hint"),
            "layer_count": value(f"{CONTROL_VECTOR_ARCH}.layer_count"),
            "tensors": {t.name: np.array(t.data, dtype=np.float32) for t in reader.tensors}}


# vectors ----------------------------------------------------------------------------------------

def _export_vectors(loaded: Any, steering: Steering, out: Path, force: bool,
                    evaluation: dict[str, Any] | None) -> Path:
    if not steering.spec.steers:
        raise UserError(f"Mode '{steering.config.mode}' steers nothing; there is nothing to export.")
    config, directions = steering.config, steering.require_directions()
    check_target(out, force)
    manifest = export_manifest(loaded, config, directions, "vectors", evaluation)
    body = [f"Steering directions and configuration for `{loaded.info.name}` (mode `{config.mode}`).", "",
            f"- Direction: {_direction_summary(config, directions)}", "", "## Usage", "", "```python",
            "from alignment_artifacts.export import load_steering",
            "from alignment_artifacts.steering import Steering",
            "config, directions = load_steering(PATH)",
            "with Steering(config, directions).apply(loaded):", "    ...", "```"]
    with atomic_directory(out, overwrite=force) as tmp:
        atomic_save_safetensors(directions.tensors(), tmp / "directions.safetensors")
        atomic_write_json(tmp / "directions.json", directions.metadata())
        atomic_write_json(tmp / STEERING_FILE, config.to_json())
        atomic_write_json(tmp / EXPORT_MANIFEST, manifest)
        _write_card(tmp, f"{loaded.info.name} steering vectors ({config.mode})", manifest, body)
    return out


def load_steering(path: str | Path) -> tuple[SteeringConfig, DirectionSet]:
    """The configuration and directions of a ``vectors`` export, ready for ``Steering(config, directions)``."""
    path = Path(path).expanduser()
    if not (path / STEERING_FILE).is_file():
        raise UserError(f"{path} is not a steering export: it has no {STEERING_FILE}. Create one with "
                        "`alignment-artifacts export --format vectors`.")
    return SteeringConfig.load(path / STEERING_FILE), DirectionSet.load(path)

