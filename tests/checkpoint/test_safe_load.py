"""A crafted checkpoint runs no code: its `.metadata` pickle, or a pickled object inside a
`.distcp` file, that would create a marker file is refused with a clear error on every load
path (convert, model.init_from.mcore, resume, avr logps), and the marker never appears."""

import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from avr_megatron.cli.main import main

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]


class _Payload:
    """Unpickling it creates `marker` (code execution, without a shell)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _avr(*args):
    return subprocess.run([sys.executable, "-m", "avr_megatron.cli.main", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.fixture(scope="module")
def trained(tmp_path_factory, toy):
    """(toy data folder, a real tiny SFT checkpoint root with model + optimizer state)."""
    run = tmp_path_factory.mktemp("safe_load") / "sft"
    out = _avr("train", "sft", "--recipe", "recipes/tiny_sft.yaml", f"run.dir={run}",
               f"data.train={toy / 'sft.jsonl'}", f"data.tokenizer={toy / 'tokenizer'}",
               "train.train_iters=1", "train.global_batch_size=2", "train.micro_batch_size=2",
               "checkpoint.save_interval=1")
    assert out.returncode == 0, out.stderr[-3000:]
    return toy, run / "checkpoints"


def _iter_dir(root: Path) -> Path:
    return root / (root / "latest").read_text().strip()


def _crafted_metadata(src: Path, dst: Path, marker: Path) -> Path:
    shutil.copytree(src, dst)
    (_iter_dir(dst) / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    return dst


def _crafted_object(src: Path, dst: Path, marker: Path) -> Path:
    """Megatron's common state (a pickled object in the .distcp file) replaced by the payload;
    `.metadata` itself stays a valid metadata file pointing at it."""
    import torch
    from torch.distributed.checkpoint.filesystem import _StorageInfo

    from avr_megatron.checkpoint.safe_load import load_metadata

    shutil.copytree(src, dst)
    ckpt = _iter_dir(dst)
    with open(ckpt / ".metadata", "rb") as f:
        md = load_metadata(f)
    index = next(i for i in md.storage_data if i.fqn.startswith("common_state"))
    info = md.storage_data[index]
    data = ckpt / info.relative_path
    offset = data.stat().st_size
    import io

    buf = io.BytesIO()
    torch.save([_Payload(marker)], buf)
    with open(data, "ab") as f:
        f.write(buf.getvalue())
    md.storage_data[index] = _StorageInfo(info.relative_path, offset, len(buf.getvalue()))
    (ckpt / ".metadata").write_bytes(pickle.dumps(md))
    return dst


CRAFT = {"metadata": (_crafted_metadata, ".metadata: refused to load _io.open"),
         "object": (_crafted_object, "refused to unpickle it")}


@pytest.mark.parametrize("kind", ["metadata"])
def test_convert_refuses_crafted_metadata(tmp_path, trained, capsys, kind):
    craft, words = CRAFT[kind]
    marker = tmp_path / "PWNED"
    evil = craft(trained[1], tmp_path / "evil", marker)
    rc = main(["convert", "mcore-to-hf", "--ckpt", str(evil), "--out", str(tmp_path / "hf"),
               "--tokenizer", str(trained[0] / "tokenizer"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and words in err and "not loaded" in err, err
    assert not marker.exists() and not (tmp_path / "hf").exists()


@pytest.mark.parametrize("kind", ["metadata", "object"])
def test_init_from_and_resume_refuse_crafted_checkpoints(tmp_path, trained, kind):
    root, ckpts = trained
    craft, words = CRAFT[kind]
    marker = tmp_path / "PWNED"
    evil = craft(ckpts, tmp_path / "evil", marker)
    data = [f"data.train={root / 'sft.jsonl'}", f"data.tokenizer={root / 'tokenizer'}",
            "train.train_iters=2", "train.global_batch_size=2", "train.micro_batch_size=2"]
    init = _avr("train", "sft", "--recipe", "recipes/tiny_sft.yaml", f"run.dir={tmp_path / 'init'}",
                f"model.init_from.mcore={evil}", *data)
    resume_dir = tmp_path / "resume"
    resume_dir.mkdir()
    shutil.copytree(evil, resume_dir / "checkpoints")
    resume = _avr("train", "sft", "--recipe", "recipes/tiny_sft.yaml", f"run.dir={resume_dir}", *data)
    for name, out in (("init_from", init), ("resume", resume)):
        assert out.returncode == 2, (name, out.stderr[-3000:])
        assert "avr train sft: error:" in out.stderr and words in out.stderr, (name, out.stderr[-3000:])
    assert not marker.exists()


def test_logps_reference_refuses_crafted_metadata(tmp_path, trained):
    root, ckpts = trained
    marker = tmp_path / "PWNED"
    evil = _crafted_metadata(ckpts, tmp_path / "evil", marker)
    out = _avr("logps", "--recipe", "recipes/tiny_dpo.yaml", f"run.dir={tmp_path / 'run'}",
               f"data.train={root / 'pairs.jsonl'}", f"data.tokenizer={root / 'tokenizer'}",
               f"model.init_from.mcore={evil}", "logps.path=" + str(tmp_path / "ref"))
    assert out.returncode == 2 and "refused to load _io.open" in out.stderr, out.stderr[-3000:]
    assert not marker.exists()


def test_real_checkpoint_metadata_loads_with_the_restricted_unpickler(trained):
    from torch.distributed.checkpoint.metadata import Metadata

    from avr_megatron.checkpoint.safe_load import load_metadata

    with open(_iter_dir(trained[1]) / ".metadata", "rb") as f:
        assert isinstance(load_metadata(f), Metadata)
