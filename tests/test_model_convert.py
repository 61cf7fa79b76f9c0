"""GPT-NeoX parity: our vanilla blocks against Hugging Face's implementation, in both directions."""

from __future__ import annotations

import pytest
import torch
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from model import MeshConfig, MeshForCausalLM
from model.convert import from_gpt_neox, main, to_gpt_neox

VOCAB = 53


def random_neox(parallel: bool, rotary_pct: float, seed: int = 0, **extra) -> GPTNeoXForCausalLM:
    torch.manual_seed(seed)
    cfg = GPTNeoXConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=80,
        max_position_embeddings=64,
        use_parallel_residual=parallel,
        rope_parameters={"rope_type": "default", "rope_theta": 1000.0, "partial_rotary_factor": rotary_pct},
        **extra,
    )
    model = GPTNeoXForCausalLM(cfg).eval()
    with torch.no_grad():  # HF's init zeroes biases and keeps LayerNorms at 1/0: perturb everything
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def ids_and_mask():
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :5] = 0  # left padding in row 1
    # Hugging Face's forward (outside generate) numbers positions 0..T-1 whatever the mask, so both
    # models get the same explicit positions.
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, pos


GRID = [(par, pct) for par in (True, False) for pct in (0.25, 1.0)]


@pytest.mark.parametrize("parallel,rotary_pct", GRID)
def test_from_gpt_neox_matches_hf_logits(parallel, rotary_pct):
    neox = random_neox(parallel, rotary_pct)
    mesh = from_gpt_neox(neox)
    assert mesh.config.layout == "3" and mesh.config.rotary_pct == rotary_pct
    assert mesh.config.use_parallel_residual is parallel and not mesh.training
    ids, mask, pos = ids_and_mask()
    with torch.no_grad():
        ref = neox(ids).logits
        assert ref.abs().max() > 0.5  # a real signal, not near-zero logits
        assert (mesh(ids).logits - ref).abs().max() <= 1e-4
        ref_m = neox(ids, attention_mask=mask, position_ids=pos).logits
        got_m = mesh(ids, attention_mask=mask, position_ids=pos).logits
        assert (got_m[0] - ref_m[0]).abs().max() <= 1e-4
        assert (got_m[1, 5:] - ref_m[1, 5:]).abs().max() <= 1e-4  # real tokens of the padded row


@pytest.mark.parametrize("parallel,rotary_pct", GRID)
def test_to_gpt_neox_matches_our_logits(parallel, rotary_pct):
    torch.manual_seed(2)
    cfg = MeshConfig.from_layout(
        "3",
        hidden_size=32,
        num_attention_heads=4,
        intermediate_size=80,
        vocab_size=VOCAB,
        use_parallel_residual=parallel,
        rotary_pct=rotary_pct,
        rotary_emb_base=500.0,
        initializer_range=0.2,
    )
    mesh = MeshForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in mesh.parameters():
            p.add_(0.1 * torch.randn_like(p))
    neox = to_gpt_neox(mesh)
    assert neox.config.rope_parameters["partial_rotary_factor"] == rotary_pct
    assert neox.config.rope_parameters["rope_theta"] == 500.0
    ids, mask, pos = ids_and_mask()
    with torch.no_grad():
        ours = mesh(ids).logits
        assert (neox(ids).logits - ours).abs().max() <= 1e-4
        back = from_gpt_neox(neox)
        assert torch.equal(back(ids).logits, ours)  # exact round trip of the weights
        # HF's own incremental decoding agrees with our full forward too.
        out = neox(ids[:, :7], use_cache=True)
        step = neox(ids[:, 7:8], cache=out.cache).logits
        assert (step[:, 0] - ours[:, 7]).abs().max() <= 1e-4


def test_dtype_is_kept():
    neox = random_neox(True, 0.25).to(torch.bfloat16)
    mesh = from_gpt_neox(neox)
    assert mesh.dtype == torch.bfloat16
    assert to_gpt_neox(mesh).dtype == torch.bfloat16


def test_recursive_and_non_neox_models_are_refused():
    cfg = MeshConfig.from_layout("1+2R2+1", scheme="mesh", hidden_size=32, num_attention_heads=4, vocab_size=VOCAB)
    with pytest.raises(ValueError, match="needs a vanilla layout .*'1\\+2R2\\+1'"):
        to_gpt_neox(MeshForCausalLM(cfg))
    scaled = MeshConfig.from_layout("2", hidden_size=32, num_attention_heads=4, vocab_size=VOCAB, scale_embeddings=True)
    with pytest.raises(ValueError, match="scale_embeddings"):
        to_gpt_neox(MeshForCausalLM(scaled))
    with pytest.raises(ValueError, match="expects a GPTNeoXForCausalLM"):
        from_gpt_neox(MeshForCausalLM(cfg))


def test_cli_round_trip(tmp_path, capsys):
    neox = random_neox(False, 0.25)
    neox.save_pretrained(tmp_path / "neox")
    (tmp_path / "neox" / "tokenizer.json").write_text("{}")
    assert main(["--from-gpt-neox", str(tmp_path / "neox"), "--out", str(tmp_path / "mesh")]) == 0
    assert "wrote MeSH checkpoint" in capsys.readouterr().out
    assert (tmp_path / "mesh" / "tokenizer.json").is_file()
    assert main(["--to-gpt-neox", str(tmp_path / "mesh"), "--out", str(tmp_path / "back")]) == 0
    mesh = MeshForCausalLM.from_pretrained(tmp_path / "mesh").eval()
    back = GPTNeoXForCausalLM.from_pretrained(tmp_path / "back").eval()
    ids = ids_and_mask()[0]
    with torch.no_grad():
        ref = neox(ids).logits
        assert (mesh(ids).logits - ref).abs().max() <= 1e-4
        assert torch.equal(back(ids).logits, ref)


def test_cli_help_and_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0 and "--from-gpt-neox" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        main(["--from-gpt-neox", str(tmp_path / "missing"), "--out", str(tmp_path / "o")])
    assert exc.value.code == 2 and "no config.json" in capsys.readouterr().err
    random_neox(True, 0.25).save_pretrained(tmp_path / "neox")
    with pytest.raises(SystemExit) as exc:  # the wrong direction for this checkpoint
        main(["--to-gpt-neox", str(tmp_path / "neox"), "--out", str(tmp_path / "o")])
    assert exc.value.code == 2 and "holds a 'gpt_neox' checkpoint" in capsys.readouterr().err
    cfg = MeshConfig.from_layout("1+1R2+1", scheme="mesh", hidden_size=32, num_attention_heads=4, vocab_size=VOCAB)
    MeshForCausalLM(cfg).save_pretrained(tmp_path / "rec")
    with pytest.raises(SystemExit) as exc:
        main(["--to-gpt-neox", str(tmp_path / "rec"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "needs a vanilla layout" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_tied_embeddings_convert_and_stay_tied(tmp_path):
    neox = random_neox(True, 0.25, tie_word_embeddings=True)
    assert neox.lm_head.weight is neox.gpt_neox.embed_in.weight
    mesh = from_gpt_neox(neox)
    assert mesh.embed_out.weight is mesh.embed_in.weight
    ids = ids_and_mask()[0]
    with torch.no_grad():
        assert (mesh(ids).logits - neox(ids).logits).abs().max() <= 1e-4
    mesh.save_pretrained(tmp_path)
    loaded = MeshForCausalLM.from_pretrained(tmp_path)
    assert loaded.embed_out.weight is loaded.embed_in.weight
    back = to_gpt_neox(loaded)
    assert back.lm_head.weight is back.gpt_neox.embed_in.weight
