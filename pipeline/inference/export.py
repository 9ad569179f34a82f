"""A trained run as a small folder to share: `python -m pipeline.export RUN --out DIR [--checkpoint best]`.

    DIR/model.safetensors   the weights that encoding and retrieval use (no optimizer, no UCCH memory bank)
    DIR/config.yaml         the run's resolved config
    DIR/model.json, tokenizer/   category names and the tokenizer (pipeline/training/run_files.py)
    DIR/test_metrics.json, provenance.json   copied from the run
    DIR/README.md           the model card: what it is, its test metrics, what made it, how to use it

Every tool takes the folder exactly like a run (`python -m pipeline.search index --run DIR ...`,
`pipeline.inference.load_run(DIR)`), and it gives the same vectors. The folder is staged under a
temporary name and renamed when complete; an existing --out is never written into.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

from data_prep import atomic_write_bytes, remove_tree, tmp_sibling
from pipeline.evaluation.table import format_tables
from pipeline.inference.runs import Run, RunError, load_run
from pipeline.training.provenance import PROVENANCE_FILE, read as read_provenance
from pipeline.training.restore import EXPORT_WEIGHTS
from pipeline.training.run_files import copy_inputs, has_inputs

COPIED = ("config.yaml", "test_metrics.json", PROVENANCE_FILE)


def export_run(run_dir, out, checkpoint: str = "best") -> Path:
    """Writes the export of the run in `run_dir` to `out` (which must not exist yet); returns `out`."""
    from safetensors.torch import save_file

    run_dir, out = Path(run_dir), Path(out)
    if not run_dir.is_dir():
        raise RunError(f"{run_dir}: no such run folder (give a folder train.py wrote, runs/<name>)")
    if out.exists():
        raise RunError(f"--out {out} exists: give a new folder (an export is never written into another one)")
    if not has_inputs(run_dir):
        raise RunError(f"{run_dir}: no model.json (made before run folders held their tokenizer and categories); "
                       f"train it again with this version to export it")
    run = load_run(run_dir, checkpoint=checkpoint)
    staged = tmp_sibling(out)
    staged.mkdir(parents=True)
    try:
        weights = {k: v.detach().cpu().contiguous().clone() for k, v in run.module.inference_state_dict().items()}
        save_file(weights, str(staged / EXPORT_WEIGHTS), metadata={"fingerprint": run.fingerprint})
        for name in COPIED:
            if (run_dir / name).is_file():
                shutil.copyfile(run_dir / name, staged / name)
        copy_inputs(run_dir, staged)
        atomic_write_bytes(staged / "README.md", model_card(run, read_provenance(run_dir)).encode())
        _shareable(staged)
        staged.rename(out)
    except BaseException:
        remove_tree(staged)
        raise
    return out


def _shareable(folder: Path) -> None:
    """One mode for the whole export, as the user's umask gives a new file (0644 under the usual 022):
    safetensors and atomic writes create their files private (0600)."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [folder, *folder.rglob("*")]:
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def _encoder_line(enc) -> str:
    extra = f", init {enc.init}" if enc.init else ""
    return f"{enc.name} (width {enc.width}{extra}{', frozen' if enc.freeze else ''})"


def family_line(run: Run) -> str:
    """The model in one phrase (the model card's and the search page's)."""
    if run.family == "hash":
        return f"cross-modal hashing, {run.dim}-bit codes compared by Hamming distance"
    if run.tokens:
        return (f"token-level fine-grained, images and captions compared token by token by {run.scorer_name} on "
                f"{run.cfg.tokens.dim}-d token sets, a {run.dim}-d global embedding screening the gallery")
    return f"fine-grained, {run.dim}-d embeddings compared by cosine similarity"


def _token_rows(run: Run) -> list[str]:
    """A token-level run's scorer and how its search ranks (empty for the other families)."""
    if not run.tokens:
        return []
    t = run.cfg.tokens
    return [f"| token scorer | {run.scorer_name}, {t.dim}-d tokens (`tokens.scorer: {t.scorer}`) |",
            f"| search | the global embedding's top {t.screen_k} by cosine (`tokens.screen_k`; `--screen-k` at query "
            f"time) re-ranked by the token scorer; scores are token scores |",
            f"| test scoring | {run.test_scoring.get('description') or run.test_scoring['mode']} |"]


def model_card(run: Run, provenance: dict | None) -> str:
    cfg = run.cfg
    d = cfg.data
    lines = [f"# {run.name}", "", f"An image-text retrieval model: {family_line(run)}. Exported from `{run.path}` "
             f"(`{run.checkpoint.name}`) by `python -m pipeline.export`.", "",
             "| | |", "|---|---|", f"| family | {cfg.model.kind}{f' ({cfg.hash.objective})' if run.family == 'hash' else ''} |", f"| representation | {run.representation} |",
             *_token_rows(run),
             f"| image encoder | {_encoder_line(cfg.model.image_encoder)} |",
             f"| text encoder | {_encoder_line(cfg.model.text_encoder)}, up to {d.max_text_len} tokens |",
             f"| image input | {d.image_size} x {d.image_size}: shorter side resized, centre square; "
             f"mean {list(d.mean)}, std {list(d.std)} |",
             f"| categories | {len(run.inputs.categories)} |", ""]
    metrics = run.test_metrics()
    lines += ["## Test metrics", "", format_tables(metrics, f"{run.name}: test") if metrics else
              "(the run has no test_metrics.json)", ""]
    if provenance:
        code, machine = provenance.get("code", {}), provenance.get("machine", {})
        versions = ", ".join(f"{k} {v}" for k, v in provenance.get("versions", {}).items())
        lines += ["## What made it", "",
                  f"- code: commit {code.get('commit')}{' with uncommitted changes' if code.get('dirty') else ''}",
                  f"- dataset: {provenance.get('dataset', {}).get('name')} "
                  f"(dataset.json sha256 {provenance.get('dataset', {}).get('card_sha256')})",
                  f"- seed {provenance.get('seed')}; {machine.get('world_size')} process(es) on "
                  f"{machine.get('devices')} {machine.get('accelerator')} device(s) x {machine.get('num_nodes')} "
                  f"node(s) {' '.join(machine.get('device_names') or [])}".rstrip(),
                  f"- {versions}", f"- started {provenance.get('started')}"
                  + (f", resumed {len(provenance['resumed'])} time(s)" if provenance.get("resumed") else ""), ""]
    lines += ["## Use", "", "```bash",
              "python -m pipeline.search index --run THIS_FOLDER --images photos/ --out photos.index",
              "python -m pipeline.search query --index photos.index --text \"a red circle\" -k 10", "```", "",
              "Files: `model.safetensors` (the weights retrieval uses; training-only state left out), "
              "`config.yaml` (the resolved config), `model.json` and `tokenizer/` (category names, tokenizer), "
              "`test_metrics.json`, `provenance.json`.", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline.export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=Path, help="a run folder (runs/<name>)")
    p.add_argument("--out", required=True, type=Path, help="the export folder to create")
    p.add_argument("--checkpoint", default="best", help="best (default; falls back to last) or last")
    args = p.parse_args(argv)
    try:
        out = export_run(args.run, args.out, args.checkpoint)
    except RunError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    metrics = json.loads((out / "test_metrics.json").read_text()) if (out / "test_metrics.json").is_file() else {}
    print(f"exported {args.run} -> {out} ({size / 1e6:.1f} MB; {len(metrics)} test metrics in README.md)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
