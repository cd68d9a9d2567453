"""Recovery: losses against naive references, the answer check, self-data distillation with a scripted teacher
(cache, resume), data order, training (quality and bit-identical resume), teacher discovery, bad input, CLI."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch
from test_recover_utils import ROWS, make_chain, tiny_lm, tiny_tokenizer, write_jsonl
from typer.testing import CliRunner

from zipkd.errors import ZipkdError
from zipkd.recover.api import RecoverConfig, find_teacher, recover
from zipkd.recover.data import (
    Example,
    RewriteSettings,
    answers_agree,
    encode_example,
    final_answer,
    load_examples,
    mixed_windows,
    self_distill,
    text_windows,
)
from zipkd.recover.losses import combined_loss, forward_kl, masked_cross_entropy, reverse_kl
from zipkd.recover.master import TrainWeights
from zipkd.recover.train import (
    FULL_LR_BY_STEPS,
    TrainConfig,
    batch_indices,
    collate,
    default_full_lr,
    fast_bf16,
    is_text_step,
    lr_at,
    resolve_precision,
)

TEXT = "\n\n".join(
    f"Paragraph {i}: the river runs past the mill and the miller counts {i} sacks of flour."
    for i in range(40)
)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    """Distilled sets go to a per-test cache."""
    monkeypatch.setattr("zipkd.recover.data.distill_cache_dir", lambda: tmp_path / "distilled")


# ------------------------------------------------------------------------------------------------- losses
def _rows(n=7, v=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, v, generator=g) * 2, torch.randn(n, v, generator=g) * 2


def test_masked_cross_entropy_matches_naive():
    logits = torch.randn(2, 5, 9, generator=torch.Generator().manual_seed(0))
    labels = torch.randint(0, 9, (2, 5), generator=torch.Generator().manual_seed(1))
    mask = torch.tensor([[0, 1, 1, 0, 1], [1, 0, 0, 0, 1]], dtype=torch.bool)
    naive = [
        -torch.log_softmax(logits[b, t], -1)[labels[b, t]] for b in range(2) for t in range(5) if mask[b, t]
    ]
    torch.testing.assert_close(
        masked_cross_entropy(logits, labels, mask), torch.stack(naive).mean(), rtol=1e-6, atol=1e-6
    )


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_kl_matches_naive(temperature):
    s, t = _rows()
    naive_f, naive_r = [], []
    for i in range(s.shape[0]):
        ps = [math.exp(x) for x in torch.log_softmax(s[i] / temperature, -1).tolist()]
        pt = [math.exp(x) for x in torch.log_softmax(t[i] / temperature, -1).tolist()]
        naive_f.append(sum(b * (math.log(b) - math.log(a)) for a, b in zip(ps, pt, strict=False)))
        naive_r.append(sum(a * (math.log(a) - math.log(b)) for a, b in zip(ps, pt, strict=False)))
    scale = temperature**2
    assert forward_kl(s, t, temperature).item() == pytest.approx(
        scale * sum(naive_f) / len(naive_f), rel=1e-5
    )
    assert reverse_kl(s, t, temperature).item() == pytest.approx(
        scale * sum(naive_r) / len(naive_r), rel=1e-5
    )
    assert forward_kl(s, s, temperature).item() == pytest.approx(0.0, abs=1e-6)
    loss, parts = combined_loss(s, torch.zeros(7, dtype=torch.long), t, "mix", 0.25, temperature)
    kd = 0.5 * (forward_kl(s, t, temperature) + reverse_kl(s, t, temperature))
    ce = masked_cross_entropy(s, torch.zeros(7, dtype=torch.long))
    torch.testing.assert_close(loss, 0.75 * ce + 0.25 * kd)
    assert set(parts) == {"ce", "kd"}


@pytest.mark.parametrize("mode", ["none", "forward", "reverse", "mix"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("train_head", [False, True])
def test_fused_head_loss_matches_the_plain_loss(mode, temperature, train_head):
    """The chunked head + loss equals `combined_loss` of the materialised logits, value and gradients (hidden
    states and head weight), with logit divisors (Granite) and chunks that do not divide the rows."""
    from zipkd.recover.losses import fused_head_loss

    g = torch.Generator().manual_seed(3)
    n, d, v = 37, 16, 101
    h = torch.randn(n, d, generator=g, dtype=torch.float64).requires_grad_()
    w = torch.randn(v, d, generator=g, dtype=torch.float64).requires_grad_(train_head)
    th, tw = (
        torch.randn(n, d, generator=g, dtype=torch.float64),
        torch.randn(v, d, generator=g, dtype=torch.float64),
    )
    y = torch.randint(0, v, (n,), generator=g)
    ref, ref_parts = combined_loss((h @ w.t()) / 1.5, y, (th @ tw.t()) / 2.0, mode, 0.3, temperature)
    got, parts = fused_head_loss(h, w, y, th, tw, mode, 0.3, temperature, chunk=8, scales=(1.5, 2.0))
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)  # fp32 softmaxes in both
    assert set(parts) == set(ref_parts)
    wrt = [h, w] if train_head else [h]
    for a, b in zip(torch.autograd.grad(3 * ref, wrt), torch.autograd.grad(3 * got, wrt), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("mode", ["none", "forward"])
@pytest.mark.parametrize("train_head", [False, True])
def test_fused_head_loss_under_autocast_matches_autocast_matmuls(mode, train_head):
    """Under bf16 autocast the fused head casts its operands once and runs the matmuls in bf16, as autocast runs
    the plain loss's `h @ w.T`: value and fp32 gradients agree with the plain loss under autocast to bf16
    rounding (bf16 keeps 8 bits, so 2e-2 relative); the weight is not changed."""
    from zipkd.recover.losses import fused_head_loss

    g = torch.Generator().manual_seed(5)
    n, d, v = 45, 32, 203
    h = torch.randn(n, d, generator=g).requires_grad_()
    w = torch.randn(v, d, generator=g).mul_(0.3).requires_grad_(train_head)
    th, tw = torch.randn(n, d, generator=g), torch.randn(v, d, generator=g).mul_(0.3)
    y = torch.randint(0, v, (n,), generator=g)
    w0 = w.detach().clone()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref, _ = combined_loss((h @ w.t()) / 1.5, y, (th @ tw.t()) / 2.0, mode, 0.3, 1.0)
        got, _ = fused_head_loss(h, w, y, th, tw, mode, 0.3, 1.0, chunk=16, scales=(1.5, 2.0))
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref.float(), rtol=2e-2, atol=1e-3)
    wrt = [h, w] if train_head else [h]
    for a, b in zip(torch.autograd.grad(ref, wrt), torch.autograd.grad(got, wrt), strict=True):
        assert b.dtype == torch.float32
        torch.testing.assert_close(b, a.float(), rtol=2e-2, atol=2e-3)
    assert torch.equal(w.detach(), w0)  # the weight cast is a copy


# ------------------------------------------------------------------------------------------ answer check
@pytest.mark.parametrize(
    "instruction, original, rewrite, ok",
    [
        ("Q", "9 - 4 = 5. So the answer is 5.", "Nine minus four leaves five. The answer is 5.", True),
        ("Q", "So the answer is 1,200.", "That makes $1200 in total.", True),
        (
            "Q",
            "So the answer is 18.",
            "She earns 18 dollars, then 20 more: 38.",
            False,
        ),  # last number differs
        ("Q", "So the answer is 18.", "The answer is 18. Then 5 more.", True),  # the stated answer counts
        ("Q", "So the answer is 7.", "I do not know.", False),
        ("Q", "26 - 5 = 21, 21 * 2 = 42. So the answer is 42.", "20 - 5 = 15. The answer is 42.", False),
        (
            "Q",
            "26 - 5 = 21, 21 * 2 = 42. So the answer is 42.",
            "He is 21; twice is 42. The answer is 42.",
            True,
        ),
        ("Q? Options: bank; library; mall.", "The answer is bank.", "It is a bank, for security.", True),
        ("Q? Options: bank; library; mall.", "The answer is bank.", "The answer is library.", False),
        ("Q? Options: bank; library; mall.", "The answer is bank.", "A bank or a library.", False),
        (
            "Q? Options: go home; go.",
            "The answer is go home.",
            "The answer is go home.",
            True,
        ),  # option inside
        ("Who?", "The answer is Eddie Murphy.", "Eddie Murphy played him.", True),
        ("Who?", "The answer is Eddie Murphy.", "Murphy played him.", False),
        ("Say hi.", "Hello there.", "Hi!", True),  # nothing to check
        ("Say hi.", "Hello there.", "   ", False),
    ],
)
def test_answers_agree(instruction, original, rewrite, ok):
    assert answers_agree(instruction, original, rewrite)[0] is ok


def test_keeps_substance():
    from zipkd.recover.data import keeps_substance

    worked = "First add 3 and 4 to get 7, then double it to get 14, then take away 2 which leaves 12. So the answer is 12."
    assert not keeps_substance(worked, "The answer is 12.")
    assert keeps_substance(
        worked, "Adding 3 and 4 gives 7; doubled that is 14, and 2 less is 12. The answer is 12."
    )
    assert keeps_substance("The answer is bank.", "Bank.")  # short originals: nothing to lose


def test_final_answer():
    assert final_answer("x. So the answer is 42.") == "42"
    assert final_answer('The answer is "live long".') == "live long"
    assert final_answer("no answer here") is None


# --------------------------------------------------------------------------------------------------- data
def test_load_examples_bad_input(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "response": "b"}\n{"instruction": "c"}\n')
    with pytest.raises(ZipkdError, match=r"bad\.jsonl:2: field 'response' is missing"):
        load_examples(bad)
    bad.write_text('{"instruction": "a", "response": 3}\n')
    with pytest.raises(ZipkdError, match=r"bad\.jsonl:1: field 'response' is not a non-empty string"):
        load_examples(bad)
    bad.write_text('{"instruction": "a", "response": "b"}\nnot json\n')
    with pytest.raises(ZipkdError, match=r"bad\.jsonl:2: not valid JSON"):
        load_examples(bad)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(ZipkdError, match="empty"):
        load_examples(empty)
    with pytest.raises(ZipkdError, match="not found"):
        load_examples(tmp_path / "missing.jsonl")


def test_encode_example_masks_response_only():
    tok = tiny_tokenizer()
    seq = encode_example(tok, Example("What is 2 + 3?", "It is 5."), max_len=512)
    targets = [i for i, t in zip(seq.ids, seq.target, strict=False) if t]
    prompt = [i for i, t in zip(seq.ids, seq.target, strict=False) if not t]
    assert tok.decode(targets) == "It is 5.<|im_end|>\n"
    assert tok.decode(prompt).endswith("What is 2 + 3?<|im_end|>\n<|im_start|>assistant\n")
    assert seq.target == sorted(seq.target)  # prompt first, then response
    assert encode_example(tok, Example("x" * 100, "y"), max_len=50) is None  # response truncated away
    # collate: the positions trained are exactly the response tokens (predicted from the left)
    ids, attn, target = collate([seq, encode_example(tok, Example("Hi", "Yo"), 512)], pad_id=tok.pad_token_id)
    select = target[:, 1:] & attn[:, 1:].bool()
    assert int(select.sum()) == len(targets) + 4  # "Y", "o", "<|im_end|>", "\n"
    assert torch.equal(ids[1, attn[1] == 0], torch.full((int((attn[1] == 0).sum()),), tok.pad_token_id))


class ScriptedTeacher(torch.nn.Module):
    """Stands in for the teacher's `generate`: replies by instruction; records how many prompts it saw."""

    def __init__(self, tok, replies, fail_after=None):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.tok, self.replies, self.fail_after, self.seen = tok, replies, fail_after, 0

    def generate(self, input_ids, attention_mask, max_new_tokens, **_):
        if self.fail_after is not None and self.seen >= self.fail_after:
            raise KeyboardInterrupt("killed")
        rows = []
        for row, m in zip(input_ids, attention_mask, strict=False):
            prompt = self.tok.decode(row[m.bool()])
            reply = next(v for k, v in self.replies.items() if f"Question: {k}" in prompt)
            new = self.tok(reply.removesuffix("…"), add_special_tokens=False)["input_ids"]
            if not reply.endswith("…"):  # "…" marks a rewrite cut off by the token budget (no EOS)
                new = new + [self.tok.eos_token_id]
            new = (new + [self.tok.pad_token_id] * max_new_tokens)[:max_new_tokens]
            rows.append(torch.tensor(new))
            self.seen += 1
        return torch.cat([input_ids, torch.stack(rows)], dim=1)


REPLIES = {
    "What is 2 + 3?": "Two plus three is five. The answer is 5.",  # agrees: kept
    "What is 4 + 4?": "Four and four make nine. The answer is 9.",  # wrong number: original kept
    "Pick a warm color.": "The answer is blue.",  # other option: original kept
    "Who wrote Hamlet?": "Hamlet was written by Shakespeare.",  # agrees
    "Say hello.": "Hi, friend! " * 30 + "…",  # truncated: original kept
    "Name a fruit.": "An apple is a fruit, a stone is not.",  # mentions the other option: original kept
}


def test_self_distill_keeps_originals_on_disagreement_and_caches(tmp_path):
    tok = tiny_tokenizer()
    examples = load_examples(write_jsonl(tmp_path / "d.jsonl"))
    settings = RewriteSettings(max_new_tokens=64, batch_size=2)
    teacher = ScriptedTeacher(tok, REPLIES)
    ds = self_distill(teacher, tok, examples, settings, teacher_hash="t1")
    by_q = {e.instruction: e.response for e in ds.examples}
    assert by_q["What is 2 + 3?"] == REPLIES["What is 2 + 3?"]
    assert by_q["Who wrote Hamlet?"] == REPLIES["Who wrote Hamlet?"]
    for q in ("What is 4 + 4?", "Say hello.", "Name a fruit. Options: apple; stone."):
        assert by_q[q] == next(r["response"] for r in ROWS if r["instruction"] == q)
    assert ds.rewritten == [e.response != o.response for e, o in zip(ds.examples, examples, strict=False)]
    assert ds.stats["rewritten"] == 2 and ds.stats["reasons"]["truncated"] == 1 and not ds.cached
    # Same teacher, data and settings: served from the cache without generating.
    again = ScriptedTeacher(tok, REPLIES)
    cached = self_distill(again, tok, examples, settings, teacher_hash="t1")
    assert cached.cached and again.seen == 0 and cached.examples == ds.examples and cached.hash == ds.hash
    # Another teacher or other settings: a different key, generated afresh.
    other = ScriptedTeacher(tok, REPLIES)
    assert self_distill(other, tok, examples, settings, teacher_hash="t2").key != ds.key and other.seen == 6


def test_self_distill_resumes_after_interruption(tmp_path):
    tok = tiny_tokenizer()
    examples = load_examples(write_jsonl(tmp_path / "d.jsonl"))
    settings = RewriteSettings(max_new_tokens=64, batch_size=2)
    with pytest.raises(KeyboardInterrupt):
        self_distill(ScriptedTeacher(tok, REPLIES, fail_after=4), tok, examples, settings, teacher_hash="t")
    rest = ScriptedTeacher(tok, REPLIES)
    ds = self_distill(rest, tok, examples, settings, teacher_hash="t")
    assert rest.seen == 2  # only the last batch was generated again
    full = self_distill(ScriptedTeacher(tok, REPLIES), tok, examples, settings, teacher_hash="t-full")
    assert ds.examples == full.examples


# --------------------------------------------------------------------------------------------- data order
def test_batch_order_is_a_pure_function_of_step():
    n, b = 10, 4
    seen = [i for s in range(5) for i in batch_indices(s, n, b, seed=3, stream=0, ratio=0.0)]
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:20]) == list(range(10))  # epochs
    assert batch_indices(7, n, b, 3, 0, 0.0) == batch_indices(7, n, b, 3, 0, 0.0)
    assert batch_indices(0, n, b, 3, 0, 0.0) != batch_indices(0, n, b, 4, 0, 0.0)
    text_steps = [s for s in range(100) if is_text_step(s, 0.3)]
    assert len(text_steps) == 30 and max(b - a for a, b in zip(text_steps, text_steps[1:], strict=False)) <= 4
    assert not any(is_text_step(s, 0.0) for s in range(10))


def test_lr_schedule():
    cfg = TrainConfig(steps=100, warmup_steps=10, lr=1e-3, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(1e-4) and lr_at(9, cfg) == pytest.approx(1e-3)
    assert lr_at(10, cfg) == pytest.approx(1e-3) and lr_at(100, cfg) == pytest.approx(1e-4)
    assert all(lr_at(s, cfg) >= lr_at(s + 1, cfg) for s in range(10, 99))


def test_default_peak_lr_follows_the_run_length_between_the_measured_anchors():
    """1e-3 up to 76 steps and 3e-4 from 400 (the two measured winners), log-linear and falling between; LoRA
    and an explicit lr do not follow the run length."""
    (s0, lr0), (s1, lr1) = FULL_LR_BY_STEPS
    assert (s0, lr0, s1, lr1) == (76, 1e-3, 400, 3e-4)
    assert (
        default_full_lr(1) == default_full_lr(76) == 1e-3
        and default_full_lr(400) == default_full_lr(5000) == 3e-4
    )
    mid = round(math.sqrt(76 * 400))  # the geometric middle of the run lengths: the geometric middle rate
    assert default_full_lr(mid) == pytest.approx(math.sqrt(1e-3 * 3e-4), rel=2e-3)
    rates = [default_full_lr(n) for n in range(76, 401)]
    assert all(a > b for a, b in zip(rates, rates[1:], strict=False))
    assert TrainConfig(steps=400).learning_rate == 3e-4 and TrainConfig(steps=60).learning_rate == 1e-3
    assert TrainConfig(steps=400, method="lora").learning_rate == 5e-4
    assert TrainConfig(steps=400, lr=2e-3).learning_rate == 2e-3


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"method": "qlora"}, "training method"),
        ({"kd": "js"}, "distillation mode"),
        ({"kd_weight": 1.5}, "kd weight"),
        ({"mix_ratio": 1.0}, "mix ratio"),
        ({"steps": 0}, "steps"),
        ({"temperature": 0}, "temperature"),
    ],
)
def test_train_config_validates(kwargs, match):
    with pytest.raises(ZipkdError, match=match):
        TrainConfig(**kwargs)


def test_auto_precision_follows_the_hardware(monkeypatch):
    assert resolve_precision("fp32", "cpu") == "fp32" and resolve_precision("bf16", "cpu") == "bf16"
    for amx, avx512_bf16 in ((True, False), (False, True)):  # either bf16 unit is enough
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v)
        assert fast_bf16("cpu") and resolve_precision("auto", "cpu") == "bf16"
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    assert resolve_precision("auto", "cpu") == "fp32"  # AVX2 only: fp32 is the fast path
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported")
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported")
    assert resolve_precision("auto", "cpu") == "fp32"  # no probe: the safe choice
    with pytest.raises(ZipkdError, match="precision"):
        TrainConfig(precision="fp8")


# ------------------------------------------------------------------------------------------------ training
def _config(tmp_path, **train):
    base = dict(
        steps=6,
        batch_size=2,
        checkpoint_every=2,
        warmup_steps=1,
        lr=3e-3,
        kd="forward",
        kd_weight=0.5,
        mix_ratio=0.5,
        max_seq_len=96,
        precision="fp32",  # the tolerances below are fp32's; `auto` would pick bf16 on AMX/AVX512-BF16 hosts
    )
    mix = tmp_path / "mix.txt"
    mix.write_text(TEXT)
    return RecoverConfig(
        data=str(write_jsonl(tmp_path / "d.jsonl", repeat=2)),
        max_examples=None,
        rewrite=RewriteSettings(max_new_tokens=12, batch_size=6),
        mix_text=str(mix),
        train=TrainConfig(**{**base, **train}),
    )


def _weights(folder):
    from safetensors.torch import load_file

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _kl_to_teacher(student, teacher, tok):
    seqs = text_windows(
        tok, ["The lantern swung above the quiet harbour while gulls argued over the nets."], 32
    )
    x = torch.tensor([s.ids for s in seqs])
    with torch.no_grad():
        return forward_kl(student(x).logits, teacher(x).logits).item()


@pytest.mark.parametrize(
    "method,precision", [("full", "fp32"), ("lora", "fp32"), ("full", "bf16"), ("lora", "bf16")]
)
def test_interrupted_training_resumes_bit_identical(tmp_path, method, precision):
    """An exception at step 5 (checkpoints every 2 steps) and a rerun end with the same weights as an
    uninterrupted run; in bf16 too, where the checkpoints hold the fp32 masters and the saved model is fp32."""
    dense, pruned = make_chain(tmp_path)
    cfg = _config(tmp_path, method=method, precision=precision)
    ref = recover(str(pruned), cfg, tmp_path / "ref")

    def crash(step, metrics):
        assert math.isfinite(metrics["loss"]) and "kd" in metrics
        if step == 5:
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        recover(str(pruned), cfg, tmp_path / "out", callback=crash)
    assert not (tmp_path / "out").exists() and (tmp_path / ".out.recover-work" / "ckpt-0000004").is_dir()
    out = recover(str(pruned), cfg, tmp_path / "out")
    manifest = json.loads((out / "zipkd.json").read_text())
    assert manifest["metrics"]["resumed_from_step"] == 4
    assert not (tmp_path / ".out.recover-work").exists()
    a, b = _weights(ref), _weights(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all(v.dtype == torch.float32 for v in b.values())
    ref_losses = json.loads((ref / "zipkd.json").read_text())["recovery"]["loss_curve"]
    assert manifest["recovery"]["loss_curve"] == ref_losses
    if method == "lora":
        assert not any("lora" in k for k in b)  # merged into the base weights


def test_one_process_trains_in_bf16_then_fp32(tmp_path):
    """accelerate keeps one mixed precision per process; recovery resets it, so a library caller can train in
    bf16 and then in fp32 (as the throughput bench does). Each run records the precision it trained in."""
    dense, pruned = make_chain(tmp_path)
    for precision in ("bf16", "fp32", "bf16"):
        out = recover(
            str(pruned), _config(tmp_path, steps=2, precision=precision), tmp_path / precision, force=True
        )
        manifest = json.loads((out / "zipkd.json").read_text())
        assert manifest["config"]["train"]["precision"] == precision
        assert all(math.isfinite(x) for x in manifest["recovery"]["loss_curve"])


def test_bf16_weights_hold_fp32_masters_and_restore_the_model():
    """bf16 weights: every fp32 parameter computes in bf16, the trainable ones are stepped as fp32 masters (the
    model follows them, rounded), and restoring gives back fp32: the masters where trained, the untouched
    originals elsewhere (a frozen weight is not rounded through bf16)."""
    lm = tiny_lm()
    lm.get_input_embeddings().weight.requires_grad_(False)  # tied to the head: frozen
    before = {n: p.detach().clone() for n, p in lm.named_parameters()}
    weights = TrainWeights(lm, bf16=True)
    assert all(p.dtype == torch.bfloat16 for p in lm.parameters())
    assert set(weights.named) == {n for n, p in lm.named_parameters() if p.requires_grad}
    assert all(
        weights.named[n].dtype == torch.float32 and torch.equal(weights.named[n], before[n])
        for n in weights.named
    )
    x = torch.randint(0, lm.config.vocab_size, (2, 9))
    lm(x, labels=x).loss.backward()
    weights.take_grads()
    assert all(weights.named[n].grad.dtype == torch.float32 for n in weights.named)
    assert all(p.grad is None for p in lm.parameters())
    with torch.no_grad():
        for p in weights.params:
            p.add_(1e-3 * p.grad.sign())  # a step far below bf16's resolution of most weights
    weights.push()
    for n, p in lm.named_parameters():
        if n in weights.named:
            assert torch.equal(p, weights.named[n].to(torch.bfloat16))
    with weights:
        pass
    for n, p in lm.named_parameters():
        assert p.dtype == torch.float32
        ref = weights.named[n] if n in weights.named else before[n]
        assert torch.equal(p, ref)
    assert any(not torch.equal(p, before[n]) for n, p in lm.named_parameters())  # the masters kept the step


def test_a_failed_setup_hands_a_library_callers_model_back_in_fp32(tmp_path, monkeypatch):
    """bf16 weights are made before the setup that can fail (accelerate's prepare, a checkpoint that does not
    load): an error there leaves the caller's model object in fp32, its weights untouched."""
    import accelerate

    import zipkd.recover.train as train_mod
    from zipkd.recover.data import TrainSeq

    lm = tiny_lm()
    before = {n: p.detach().clone() for n, p in lm.named_parameters()}

    def broken(*a, **k):
        raise RuntimeError("prepare failed")

    monkeypatch.setattr(accelerate.Accelerator, "prepare", broken)
    qa = [TrainSeq([5, 6, 7, 8], [True] * 4)]
    cfg = TrainConfig(steps=2, batch_size=1, precision="bf16", mix_ratio=0.0)
    with pytest.raises(RuntimeError, match="prepare failed"):
        train_mod.train(lm, None, qa, [], cfg, tmp_path / "work", 0)
    for n, p in lm.named_parameters():
        assert p.dtype == torch.float32 and torch.equal(p, before[n]), n


def test_bf16_weights_give_a_weight_that_was_bf16_an_fp32_master_and_keep_its_dtype():
    """A weight that is bf16 already (a bf16 model passed in) is stepped as an fp32 master of its own; restoring
    leaves it bf16, holding the master's rounding."""
    lm = tiny_lm()
    norm = lm.model.norm.weight
    norm.data = norm.data.to(torch.bfloat16)
    weights = TrainWeights(lm, bf16=True)
    name = next(n for n, p in lm.named_parameters() if p is norm)
    assert weights.named[name].dtype == torch.float32 and torch.equal(weights.named[name], norm.float())
    with torch.no_grad():
        weights.named[name].add_(0.25)
    weights.push()
    weights.restore()
    assert norm.dtype == torch.bfloat16 and torch.equal(norm, weights.named[name].to(torch.bfloat16))


def test_bf16_weights_train_like_fp32_weights_under_autocast(tmp_path):
    """Six steps with bf16 weights and fp32 masters against fp32 weights under bf16 autocast (the earlier path):
    both move every trained weight the same way (per tensor, the cosine of the two updates is above 0.9; bf16
    rounding differs between the paths, so not exactly)."""
    dense, pruned = make_chain(tmp_path)
    start = _weights(pruned)
    a = _weights(recover(str(pruned), _config(tmp_path, precision="bf16"), tmp_path / "w"))
    b = _weights(
        recover(str(pruned), _config(tmp_path, precision="bf16", bf16_weights=False), tmp_path / "a")
    )
    moved = 0
    for k in a:
        assert a[k].dtype == torch.float32
        da, db = (a[k] - start[k]).flatten(), (b[k] - start[k]).flatten()
        if db.norm() == 0:
            assert da.norm() == 0
            continue
        moved += 1
        assert torch.nn.functional.cosine_similarity(da, db, dim=0) > 0.9, k
    assert moved > 0


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_train_embeddings_trains_the_tied_head_and_the_default_leaves_it(tmp_path, precision):
    """Full fine-tuning freezes the (tied) embeddings and LM head by default; `train_embeddings` trains them,
    with bf16 weights too (one fp32 master for the tied pair), and the saved model is still tied."""
    from zipkd.models.io import load_model

    dense, pruned = make_chain(tmp_path)
    start = _weights(pruned)["model.embed_tokens.weight"]
    for train_embeddings in (False, True):
        cfg = _config(tmp_path, steps=3, precision=precision, train_embeddings=train_embeddings)
        out = recover(str(pruned), cfg, tmp_path / f"emb-{train_embeddings}")
        w = _weights(out)
        assert w["model.embed_tokens.weight"].dtype == torch.float32
        assert torch.equal(w["model.embed_tokens.weight"], start) != train_embeddings
        assert any(not torch.equal(w[k], _weights(pruned)[k]) for k in w if "layers" in k)
        model = load_model(out).model
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight


def test_fused_and_plain_training_agree(tmp_path):
    """Six steps with the fused head/loss and with the plain path end at the same weights (float rounding)."""
    dense, pruned = make_chain(tmp_path)
    a = _weights(recover(str(pruned), _config(tmp_path), tmp_path / "fused"))
    b = _weights(recover(str(pruned), _config(tmp_path, fused_loss=False), tmp_path / "plain"))
    assert a.keys() == b.keys()
    moved = 0
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
        moved += int(not torch.equal(a[k], _weights(pruned)[k]))
    assert moved > 0


def test_distillation_moves_the_student_towards_the_teacher(tmp_path):
    """Recovered beats pruned: on text seen in no training step, KL(teacher ‖ student) drops."""
    from zipkd.models.io import load_model

    dense, pruned = make_chain(tmp_path)
    cfg = _config(tmp_path, steps=16, kd_weight=1.0, lr=1e-2, checkpoint_every=100)
    out = recover(str(pruned), cfg, tmp_path / "rec")
    tok = tiny_tokenizer()
    teacher, before, after = (load_model(p).model for p in (dense, pruned, out))
    kl_before, kl_after = _kl_to_teacher(before, teacher, tok), _kl_to_teacher(after, teacher, tok)
    assert kl_after < 0.8 * kl_before, (kl_before, kl_after)


def test_default_recipe_uses_the_teacher_for_the_rewrites_only(tmp_path, monkeypatch):
    """KD is off by default: the teacher rewrites the responses, then training gets no teacher (no forward pass
    per step, and the teacher is freed); `--kd forward` hands it to training."""
    import zipkd.recover.api as api

    assert TrainConfig().kd == "none" and not TrainConfig().uses_teacher
    dense, pruned = make_chain(tmp_path)
    seen, real = [], api.train

    def spy(model, teacher, *args, **kwargs):
        seen.append(teacher)
        return real(model, teacher, *args, **kwargs)

    monkeypatch.setattr(api, "train", spy)
    recover(str(pruned), _config(tmp_path, steps=2, kd="none"), tmp_path / "a")
    recover(str(pruned), _config(tmp_path, steps=2), tmp_path / "b")
    assert seen[0] is None and seen[1] is not None
    m = json.loads((tmp_path / "a" / "zipkd.json").read_text())
    assert m["recovery"]["distilled_set"]["hash"]  # the rewrites were still made


def test_manifest_records_the_run(tmp_path):
    dense, pruned = make_chain(tmp_path)
    out = recover(
        str(pruned), _config(tmp_path, steps=2, kd="reverse", precision="auto"), tmp_path / "rec", force=False
    )
    m = json.loads((out / "zipkd.json").read_text())
    roles = {i["role"]: i for i in m["inputs"]}
    assert roles["teacher"]["path"] == str(dense) and roles["teacher"]["sha256"]
    assert roles["model"]["path"] == str(pruned) and roles["data"]["sha256"] and roles["mix_text"]["sha256"]
    rec = m["recovery"]
    assert rec["data_hash"] and rec["distilled_set"]["hash"] and rec["distilled_set"]["cache_key"]
    assert m["stage"] == "recover" and m["seed"] == 0 and m["config"]["train"]["kd"] == "reverse"
    # `auto` is recorded resolved.
    assert m["config"]["train"]["precision"] == resolve_precision("auto", "cpu")
    assert math.isfinite(m["metrics"]["final_loss"]) and m["metrics"]["tokens"] > 0
    assert find_teacher(out) == dense  # recover → prune → dense
    with pytest.raises(ZipkdError, match="already exists"):
        recover(str(pruned), _config(tmp_path, steps=2), tmp_path / "rec")


# ------------------------------------------------------------------------------------------- teacher, bad input
def test_find_teacher_chain_and_errors(tmp_path):
    from zipkd.models.io import save_model

    dense, pruned = make_chain(tmp_path)
    assert find_teacher(pruned) == dense
    with pytest.raises(ZipkdError, match="not a pruned model"):
        find_teacher(dense)
    bare = save_model(tiny_lm(), tiny_tokenizer(), tmp_path / "bare", stage="prune", inputs={})
    with pytest.raises(ZipkdError, match="names no input model"):
        find_teacher(bare)
    (dense / "config.json").rename(dense / "config.moved")
    with pytest.raises(ZipkdError, match="missing; pass --teacher"):
        find_teacher(pruned)


def test_changed_teacher_is_refused(tmp_path):
    dense, pruned = make_chain(tmp_path)
    cfg = json.loads((dense / "config.json").read_text())
    (dense / "config.json").write_text(json.dumps({**cfg, "rms_norm_eps": 1e-3}))
    with pytest.raises(ZipkdError, match="has changed"):
        find_teacher(pruned)


def test_teacher_with_another_tokenizer_is_refused(tmp_path):
    _, pruned = make_chain(tmp_path, teacher_tokenizer=tiny_tokenizer(reverse=True))
    with pytest.raises(ZipkdError, match="tokenizer .* differs"):
        recover(str(pruned), _config(tmp_path, steps=1), tmp_path / "rec")
    assert not (tmp_path / "rec").exists()


def test_empty_and_malformed_data_are_refused(tmp_path):
    _, pruned = make_chain(tmp_path)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    cfg = _config(tmp_path, steps=1)
    cfg.data = str(empty)
    with pytest.raises(ZipkdError, match="empty"):
        recover(str(pruned), cfg, tmp_path / "rec")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "x", "answer": "y"}\n')
    cfg.data = str(bad)
    with pytest.raises(ZipkdError, match=r"bad\.jsonl:1: field 'response'"):
        recover(str(pruned), cfg, tmp_path / "rec")


def test_cli_recover(tmp_path):
    from zipkd.cli import app

    _, pruned = make_chain(tmp_path)
    data = write_jsonl(tmp_path / "d.jsonl")
    (tmp_path / "mix.txt").write_text(TEXT)
    runner = CliRunner()
    args = [
        "recover",
        str(pruned),
        "-o",
        str(tmp_path / "rec"),
        "--data",
        str(data),
        "--steps",
        "2",
        "--batch-size",
        "2",
        "--max-new-tokens",
        "8",
        "--mix-text",
        str(tmp_path / "mix.txt"),
        "--max-seq-len",
        "96",
        "--kd",
        "mix",
        "--json",
    ]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout[res.stdout.index("{") :])
    assert summary["steps"] == 2 and summary["examples"] == 6 and (tmp_path / "rec" / "zipkd.json").is_file()
    res = runner.invoke(app, args)  # exists, no --force
    assert res.exit_code == 2 and "already exists" in res.stderr
    res = runner.invoke(app, [*args[:-3], "--kd", "js"])
    assert res.exit_code == 2 and "js" in res.stderr


def _topic_text(word: str, n: int) -> list[str]:
    """Documents whose 16-token windows all differ (counting numbers, their digits spelt in `word`'s letters): two
    words without common letters give sources without common windows."""
    spell = str.maketrans("0123456789", (word * 10)[:10])
    return [f"{word} " + " ".join(str(1000 * i + 7 * j).translate(spell) for j in range(8)) for i in range(n)]


def test_mixed_windows_follow_the_weights_without_repeats():
    """Windows of each source in proportion to its weight, the pool sized by the scarcest source, no window twice,
    the same windows for the same seed and other windows of the plentiful source for another seed."""
    tok = tiny_tokenizer()
    many, few = _topic_text("abcde", 200), _topic_text("fghij", 40)
    n_many, n_few = (len(text_windows(tok, t, 16)) for t in (many, few))
    assert all(
        len({tuple(w.ids) for w in text_windows(tok, t, 16)}) == n for t, n in ((many, n_many), (few, n_few))
    )
    out = mixed_windows(tok, [(many, 3.0), (few, 1.0)], 16, seed=0)
    few_ids = {tuple(w.ids) for w in text_windows(tok, few, 16)}
    got_few = sum(tuple(w.ids) in few_ids for w in out)
    assert got_few == n_few and len(out) == 4 * n_few  # the scarce source is a quarter, all of it used
    assert len(out) - got_few == 3 * n_few < n_many
    assert len({tuple(w.ids) for w in out}) == len(out)  # no repeats
    assert [w.ids for w in mixed_windows(tok, [(many, 3.0), (few, 1.0)], 16, seed=0)] == [w.ids for w in out]
    other = mixed_windows(tok, [(many, 3.0), (few, 1.0)], 16, seed=1)
    assert {tuple(w.ids) for w in other} != {tuple(w.ids) for w in out}
    # one source: exactly its windows
    assert [w.ids for w in mixed_windows(tok, [(many, 1.0)], 16)] == [
        w.ids for w in text_windows(tok, many, 16)
    ]


def test_mix_text_weights_are_validated(tmp_path):
    cfg = RecoverConfig(mix_text=[f"{tmp_path}/a.txt:3", f"{tmp_path}/b.txt"])
    assert [(p.name, w) for p, w in cfg.mix_sources] == [("a.txt", 0.75), ("b.txt", 0.25)]
    assert RecoverConfig(mix_text=f"{tmp_path}/a.txt").mix_text == (f"{tmp_path}/a.txt",)
    with pytest.raises(ZipkdError, match="mixing text weight"):
        RecoverConfig(mix_text=[f"{tmp_path}/a.txt:-1"])
    assert RecoverConfig().mix_sources  # the default mix names real files
    assert all(p.is_file() for p, _ in RecoverConfig().mix_sources)


def test_several_mix_files_reach_the_manifest(tmp_path):
    _, pruned = make_chain(tmp_path)
    (tmp_path / "a.txt").write_text("\n\n".join(_topic_text("abcde", 60)))
    (tmp_path / "b.txt").write_text("\n\n".join(_topic_text("fghij", 60)))
    cfg = replace(_config(tmp_path, steps=2), mix_text=[f"{tmp_path}/a.txt:2", f"{tmp_path}/b.txt:1"])
    out = recover(str(pruned), cfg, tmp_path / "rec")
    m = json.loads((out / "zipkd.json").read_text())
    roles = {i["role"]: i for i in m["inputs"]}
    assert roles["mix_text.0"]["sha256"] and roles["mix_text.1"]["path"].endswith("b.txt")
    assert [x.rsplit(":", 1)[1] for x in m["config"]["mix_text"]] == ["0.666667", "0.333333"]
    from zipkd.cli import app

    res = CliRunner().invoke(
        app, ["recover", str(pruned), "-o", str(tmp_path / "bad"), "--mix-text", f"{tmp_path}/a.txt:zero:0"]
    )
    assert res.exit_code == 2 and "mixing text weight" in res.stderr


def test_checkpoints_of_another_run_are_discarded(tmp_path):
    from zipkd.recover.train import prepare_work_dir

    work = tmp_path / "work"
    prepare_work_dir(work, "run-a")
    (work / "ckpt-0000004").mkdir()
    (work / "ckpt-0000004" / "state.json").write_text("{}")
    prepare_work_dir(work, "run-a")  # same run: kept for resuming
    assert (work / "ckpt-0000004").is_dir()
    prepare_work_dir(work, "run-b")  # other inputs or settings: never resumed from
    assert not (work / "ckpt-0000004").exists()


def test_pack_fills_rows_first_fit_decreasing():
    from zipkd.recover.data import TrainSeq
    from zipkd.recover.train import pack

    lens = [5, 9, 3, 7, 2, 12]
    seqs = [
        TrainSeq(list(range(100 * i + 1, 100 * i + 1 + n)), [False] + [True] * (n - 1))
        for i, n in enumerate(lens)
    ]
    ids, attn, target, pos = pack(seqs, 0, 12)
    # first-fit decreasing over capacity 12: [12], [9, 3], [7, 5], [2]
    assert ids.shape == (4, 12)
    rows = [[t for t in r.tolist() if t] for r in ids]
    assert rows[0] == seqs[5].ids and rows[1] == seqs[1].ids + seqs[2].ids
    assert rows[2] == seqs[3].ids + seqs[0].ids and rows[3] == seqs[4].ids
    assert int(attn.sum()) == sum(lens)  # every token once, nothing else counted
    assert pos[1].tolist() == list(range(9)) + list(range(3))
    assert pos[3].tolist() == [0, 1] + list(range(10))  # the padding restarts too
    # a sequence's first token is never a target (it would be predicted from its neighbour)
    assert not target[1, 9] and target[1, 10] and not target[3, 2:].any()
    assert int(target.sum()) == sum(n - 1 for n in lens)
    # a sequence longer than the capacity gets a row of its own
    ids2, *_ = pack([TrainSeq([1] * 20, [True] * 20), TrainSeq([2] * 3, [True] * 3)], 0, 12)
    assert ids2.shape == (2, 20)


def test_packed_and_padded_training_agree(tmp_path, monkeypatch):
    """Six steps with packed rows and with padded rows end at the same weights (float rounding); the packed run
    did share rows."""
    import zipkd.recover.train as train_mod

    shared = []
    real_pack = train_mod.pack

    def counting_pack(items, pad_id, capacity, rows=None):
        out = real_pack(items, pad_id, capacity, rows)
        shared.append(out[0].shape[0] < len(items))
        return out

    monkeypatch.setattr(train_mod, "pack", counting_pack)
    dense, pruned = make_chain(tmp_path)
    kw = dict(
        max_seq_len=160, batch_size=4
    )  # rows of 160 hold two of these examples: packing saves positions
    a = _weights(recover(str(pruned), _config(tmp_path, **kw), tmp_path / "packed"))
    assert any(shared)
    b = _weights(recover(str(pruned), _config(tmp_path, pack=False, **kw), tmp_path / "padded"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "value,expected",
    [("2M", 2_000_000), ("500k", 500_000), ("1.5m", 1_500_000), (" 7 ", 7), (12, 12), (None, None)],
)
def test_token_counts_parse(value, expected):
    from zipkd.recover.train import parse_count

    assert parse_count(value) == expected


@pytest.mark.parametrize(
    "value,expected",
    [("20m", 1200.0), ("90s", 90.0), ("1.5h", 5400.0), ("45", 45.0), (30, 30.0), (None, None)],
)
def test_durations_parse(value, expected):
    from zipkd.recover.train import parse_duration

    assert parse_duration(value) == expected


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"tokens": "2X"}, "cannot read '2X' as a token count"),
        ({"tokens": "-5"}, "cannot read"),
        ({"tokens": 0}, "positive count"),
        ({"budget": "soon"}, "cannot read 'soon' as a duration"),
        ({"budget": "0m"}, "cannot read"),
        ({"budget": "20m", "tokens": "1M"}, "not both"),
        ({"budget": "20m", "warmup_steps": 1}, "at least 2 warm-up steps"),
    ],
)
def test_budgets_are_validated(kwargs, match):
    with pytest.raises(ZipkdError, match=match):
        TrainConfig(**kwargs)


def test_token_budget_plans_the_fewest_steps_that_carry_the_tokens(tmp_path):
    from dataclasses import replace

    from zipkd.recover.train import step_batch

    dense, pruned = make_chain(tmp_path)
    cfg = replace(_config(tmp_path, tokens=700), distill=False)
    out = recover(str(pruned), cfg, tmp_path / "out")
    m = json.loads((out / "zipkd.json").read_text())["metrics"]
    assert m["tokens"] >= 700
    # naive reference: the loop's own batches, counted one step at a time
    tok = tiny_tokenizer()
    from zipkd.data.text import load_texts
    from zipkd.recover.data import encode_examples, load_examples, text_windows

    qa = encode_examples(tok, load_examples(cfg.data), cfg.train.max_seq_len)
    text = text_windows(tok, load_texts(cfg.mix_text[0]), cfg.train.max_seq_len)
    counts = [int(step_batch(s, qa, text, cfg.train, 0)[1][:, :-1].sum()) for s in range(m["steps"])]
    assert sum(counts) == m["tokens"] and sum(counts[:-1]) < 700


def test_time_budget_plans_steps_from_the_warmup_speed_and_resumes_on_the_plan(tmp_path, monkeypatch):
    """A fake clock that advances 1 s per reading: the plan is fixed at step 2 (warm-up 2) from the speed of the
    steps after the first, inside the deadline; a run killed after the first checkpoint resumes on the stored
    plan even when the clock now runs 10x faster."""
    import itertools

    import zipkd.recover.train as train_mod

    ticks = itertools.count()
    monkeypatch.setattr(train_mod, "_clock", lambda: float(next(ticks)))
    dense, pruned = make_chain(tmp_path)
    cfg = _config(tmp_path, budget=30, warmup_steps=2, checkpoint_every=2, steps=999)
    ref = recover(str(pruned), cfg, tmp_path / "ref")
    steps = json.loads((ref / "zipkd.json").read_text())["metrics"]["steps"]
    # readings: start 0 (recover), deadline 30; loop start 1; step ends 2, 3; plan at 4: 2 + ⌊(30−4)·0.97 / 1⌋
    assert steps == 2 + int((30 - 4) * 0.97)

    ticks = itertools.count()

    def crash(step, metrics):
        if step == 3:
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        recover(str(pruned), cfg, tmp_path / "out", callback=crash)
    fast = itertools.count()
    monkeypatch.setattr(train_mod, "_clock", lambda: next(fast) / 10.0)
    out = recover(str(pruned), cfg, tmp_path / "out")
    manifest = json.loads((out / "zipkd.json").read_text())
    assert manifest["metrics"]["steps"] == steps and manifest["metrics"]["resumed_from_step"] == 2
    a, b = _weights(ref), _weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_time_budget_warms_up_toward_the_planned_runs_default_lr(tmp_path, monkeypatch):
    """Before a time budget's steps are counted (provisionally halfway through a 4-step warm-up, at step 2), the
    ramp heads for the longest run's peak (3e-4); from there on, for the counted run's (1e-3, at most 76 steps).
    The count is fixed at the warm-up's end (step 4), the ramp only rises, and the manifest records the peak."""
    import itertools

    import zipkd.recover.train as train_mod

    ticks = itertools.count()
    monkeypatch.setattr(train_mod, "_clock", lambda: float(next(ticks)))
    seen: list[tuple[int, float, float]] = []
    real = train_mod.lr_at

    def spy(step, cfg):  # called once per parameter group: kept once per step
        if not seen or seen[-1][0] != step:
            seen.append((step, cfg.learning_rate, real(step, cfg)))
        return real(step, cfg)

    monkeypatch.setattr(train_mod, "lr_at", spy)
    dense, pruned = make_chain(tmp_path)
    cfg = _config(tmp_path, budget=30, warmup_steps=4, checkpoint_every=100, steps=999, lr=None, kd="none")
    out = recover(str(pruned), cfg, tmp_path / "out")
    metrics = json.loads((out / "zipkd.json").read_text())["metrics"]
    # readings: start 0 (deadline 30), loop start 1, step ends 2, 3, provisional count at 4, step ends 5, 6, the
    # count at 7 from the steps after the first: 4 + ⌊(30 − 7)·0.97 / ((6 − 2) / 3)⌋ = 20. Then 1 s a step (step k
    # ends at k + 3); at step 16 (ends 19) the count grows from the speed since step 4, (19 − 6) / 12, and the
    # reading 20: 16 + ⌊(30 − 20)·0.97 / (13 / 12)⌋ = 24
    assert 4 + int((30 - 7) * 0.97 // (4 / 3)) == 20
    assert metrics["steps"] == 16 + int((30 - 20) * 0.97 // (13 / 12)) == 24 and metrics["peak_lr"] == 1e-3
    peaks = [(s, peak) for s, peak, _ in seen[:5]]
    assert peaks == [(0, 3e-4), (1, 3e-4), (2, 1e-3), (3, 1e-3), (4, 1e-3)]
    ramp = [lr for s, _, lr in seen if s < 4]
    assert ramp == pytest.approx([3e-4 / 4, 3e-4 / 2, 1e-3 * 3 / 4, 1e-3])
    assert all(a < b for a, b in zip(ramp, ramp[1:], strict=False))


def test_time_budget_stops_before_the_deadline_when_later_steps_run_slower(tmp_path, monkeypatch):
    """The plan is fixed from the first steps' speed; when later steps take 3x as long (longer batches, a busier
    machine), the run does not start the step that would end past the deadline, instead of overrunning it."""
    import zipkd.recover.train as train_mod

    readings = []

    def clock() -> float:  # 1 s per reading up to the plan (reading 4), then 3 s per reading
        n = len(readings)
        readings.append(float(n) if n <= 4 else 4.0 + 3.0 * (n - 4))
        return readings[-1]

    monkeypatch.setattr(train_mod, "_clock", clock)
    dense, pruned = make_chain(tmp_path)
    cfg = _config(tmp_path, budget=30, warmup_steps=2, checkpoint_every=100, steps=999)
    out = recover(str(pruned), cfg, tmp_path / "out")
    steps = json.loads((out / "zipkd.json").read_text())["metrics"]["steps"]
    # planned 2 + ⌊(30−4)·0.97⌋ = 27 steps at 1 s; at 3 s a reading, step k ends at 3k − 2 up to step 8 (22),
    # where the extension reads the clock (25: 8 + ⌊(30 − 25)·0.97 / (19 / 6)⌋ = 9 steps, no extension); step 9
    # ends at 28 and step 10 would end at 34 > 30, so 9 steps run
    assert steps == 9
    assert max(r for r in readings if r <= 30) == 28.0


def test_time_budget_extends_the_count_when_later_steps_run_faster(tmp_path, monkeypatch):
    """Warm-up steps that run slow (3 s) plan too few steps for the budget; at step 4·2 = 8 (four times the plan's
    step) the count grows from the speed since the plan (1 s a step), so the run uses its budget instead of
    stopping with a third of it left. The same run without the extension point (it lies past the planned count)
    keeps the short plan."""
    import zipkd.recover.train as train_mod

    def run(name: str, budget: int) -> tuple[int, list[float]]:
        readings: list[float] = []

        def clock() -> float:  # 3 s per reading up to the plan (reading 4), then 1 s per reading
            n = len(readings)
            readings.append(3.0 * n if n <= 4 else 12.0 + (n - 4))
            return readings[-1]

        monkeypatch.setattr(train_mod, "_clock", clock)
        cfg = _config(tmp_path, budget=budget, warmup_steps=2, checkpoint_every=100, steps=999)
        out = recover(str(pruned), cfg, tmp_path / name)
        return json.loads((out / "zipkd.json").read_text())["metrics"]["steps"], readings

    dense, pruned = make_chain(tmp_path)
    steps, readings = run("long", 48)
    # readings: 0 the start, 3 the loop's start, 6 and 9 steps 1-2, 12 the plan: 2 + ⌊(48−12)·0.97 / 3⌋ = 13
    # steps. Then 1 s a reading: step k ends at k + 10, step 8 at 18; the speed since step 2, (18 − 9) / 6, and
    # the reading 19 give 8 + ⌊(48 − 19)·0.97 / 1.5⌋ = 26 steps, the last ending at 37
    assert steps == 26 and max(readings) == 37
    short, _ = run("short", 20)  # plans 2 + ⌊(20−12)·0.97/3⌋ = 4 steps: step 8 never comes
    assert short == 4


def test_cli_recover_rejects_a_bad_budget_in_one_line(tmp_path):
    from typer.testing import CliRunner

    from zipkd.cli import app

    dense, pruned = make_chain(tmp_path)
    r = CliRunner().invoke(app, ["recover", str(pruned), "-o", str(tmp_path / "o"), "--budget", "soon"])
    assert r.exit_code != 0 and "cannot read 'soon' as a duration" in r.output
    assert "Traceback" not in r.output and not (tmp_path / "o").exists()


def test_batches_pack_only_when_it_saves_positions():
    from zipkd.recover.data import TrainSeq
    from zipkd.recover.train import step_batch

    cfg = TrainConfig(batch_size=4, max_seq_len=16, mix_ratio=0.5)
    qa = [TrainSeq([5] * n, [True] * n) for n in (3, 12, 4, 9)]
    windows = [TrainSeq([7] * 8, [True] * 8) for _ in range(4)]
    ids, attn, target, pos = step_batch(0, qa, windows, cfg, 0)  # step 0 trains on instructions
    assert pos is not None and ids.numel() < 4 * 12
    ids, attn, target, pos = step_batch(1, qa, windows, cfg, 0)  # step 1 on text: 4 x 8 either way
    assert pos is None and ids.shape == (4, 8)
