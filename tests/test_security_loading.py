"""Safe loading: weights only from safetensors (a pickle file is never unpickled, a pickle-only checkpoint
is refused), and a corrupt, truncated or mismatched checkpoint makes `python -m server` exit 2 with one
line naming the file and the problem.
"""

from __future__ import annotations

import json
import pickle
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from server import Engine, EngineConfig
from server import __main__ as cli


@pytest.fixture
def good(ckpt):
    return ckpt


def copy(good, tmp_path):
    return shutil.copytree(good, tmp_path / "ckpt")


def edit_tensors(path, fn):
    tensors = load_file(str(path / "model.safetensors"))
    fn(tensors)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})


def truncate(path):
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])


def pickle_only(path):
    torch.save(load_file(str(path / "model.safetensors")), path / "pytorch_model.bin")
    (path / "model.safetensors").unlink()


def set_config(path, **kw):
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, **kw}))


CASES = [
    ("truncated", truncate, "model.safetensors: not a valid safetensors file (Error while deserializing header: incomplete metadata"),
    ("garbage", lambda p: (p / "model.safetensors").write_bytes(b"\x00" * 7 + b"not a tensor file" * 50), "model.safetensors: not a valid safetensors file"),
    ("empty", lambda p: (p / "model.safetensors").write_bytes(b""), "model.safetensors: not a valid safetensors file"),
    ("pickle-only", pickle_only, "pytorch_model.bin: pickle weights are refused"),
    ("no-weights", lambda p: (p / "model.safetensors").unlink(), "no model.safetensors (or model.safetensors.index.json) found"),
    ("missing-tensor", lambda p: edit_tensors(p, lambda t: t.pop("coda.0.mlp.dense_4h_to_h.weight")),
     "model.safetensors: does not match config.json: tensor coda.0.mlp.dense_4h_to_h.weight missing"),
    ("extra-tensor", lambda p: edit_tensors(p, lambda t: t.update(backdoor=torch.zeros(3))),
     "model.safetensors: does not match config.json: unexpected tensor backdoor"),
    ("wrong-shape", lambda p: set_config(p, intermediate_size=96), "model.safetensors: does not match config.json: tensor "),
    ("nan-weights", lambda p: edit_tensors(p, lambda t: t["embed_in.weight"].__setitem__((3, 0), float("nan"))),
     "model.safetensors: tensor embed_in.weight holds NaN or infinite values"),
    ("config-not-json", lambda p: (p / "config.json").write_text("{not json"), "config.json: not valid JSON"),
    ("config-other-model", lambda p: set_config(p, model_type="llama"), "config.json: model_type is 'llama', not 'mesh'"),
    ("config-invalid", lambda p: set_config(p, num_attention_heads=5), "config.json: invalid config"),
    ("no-config", lambda p: (p / "config.json").unlink(), "config.json: missing"),
    ("tokenizer-corrupt", lambda p: (p / "tokenizer.json").write_text('{"version": "1.0", "model": 3}'), "tokenizer.json: cannot be loaded"),
    ("no-tokenizer", lambda p: (p / "tokenizer.json").unlink(), "tokenizer.json: missing"),
]


@pytest.mark.parametrize("name,damage,needle", CASES, ids=[c[0] for c in CASES])
def test_a_bad_checkpoint_is_one_line_naming_the_file(good, tmp_path, capsys, name, damage, needle):
    path = copy(good, tmp_path)
    damage(path)
    assert cli.main(["--model", str(path), "--port", "1"]) == 2  # fails while loading, before binding the port
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith(f"python -m server: error: {path}"), err
    assert needle in err, err


def test_a_pickle_next_to_the_safetensors_is_never_unpickled(good, tmp_path):
    path = copy(good, tmp_path)
    marker = tmp_path / "pwned"

    class Payload:  # unpickling this would create `marker`
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (path / "pytorch_model.bin").write_bytes(pickle.dumps(Payload()))
    (path / "training_args.bin").write_bytes(pickle.dumps(Payload()))
    engine = Engine(EngineConfig(model=path), metrics=False)
    assert not marker.exists()
    # and the weights are the safetensors ones
    want = load_file(str(good / "model.safetensors"))["embed_in.weight"]
    assert torch.equal(engine.model.embed_in.weight, want)
