"""
Tests of calibrate.py on tiny random transformers teachers: the per-channel features reproduce the time-mix's own
output, the calibrated init lowers the step-1 alignment loss on tokens it never saw, the calibrated student saves
and reloads with identical logits, and attention layers, the rest of the student and the teacher stay untouched.
Run: `python -m pytest -q test_calibrate.py`.
"""
import pytest
import torch

import calibrate
import qrwkv

TINY = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.15)


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def teacher(request, tmp_path_factory):
    """llama: q/k/v/o biases (the q bias is scaled with q_proj's rows), and layers 0-1 made purely positional heads
    (q, k constant, so attention depends on distance only, like a real model's local heads); qwen3: random, with
    q/k norms (per-head readout only)."""
    import transformers as tf
    torch.manual_seed(0)
    if request.param == "llama":
        cfg = tf.LlamaConfig(**TINY, attention_bias=True, tie_word_embeddings=True)
    else:
        cfg = tf.Qwen3Config(**TINY, head_dim=16, tie_word_embeddings=False)
    path = tmp_path_factory.mktemp(request.param)
    tf.AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    teacher = qrwkv.load_model(str(path), dtype=torch.float32)
    with torch.no_grad():
        for attn in [teacher.model.layers[i].self_attn for i in (0, 1)] if request.param == "llama" else []:
            attn.q_proj.weight.zero_(), attn.k_proj.weight.zero_(), attn.q_proj.bias.normal_(0, 2), attn.k_proj.bias.normal_(0, 2)
    return teacher


def batches(n, seed, T=64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, TINY["vocab_size"], (2, T), generator=g) for _ in range(n)]


def step0_loss(student, teacher, ids):
    """The step-1 loss at step 0 (SPEC §5): mean over layers and tokens of ‖y_teacher − y_student‖₂ / √C, every
    time-mix fed the teacher's normalised input."""
    layers = [i for i in range(TINY["num_hidden_layers"]) if i not in student.config.attention_layers]
    io = calibrate.capture_attention_io(teacher, ids, layers)
    with torch.no_grad():
        ys = [torch.cat([student.model.layers[i].self_attn(x, c, s)[0] for x, c, s in
                         zip(io[i]["x"], io[i]["cos"], io[i]["sin"])], 1) for i in layers]
        err = [(torch.cat(io[i]["y"], 1) - y).norm(dim=-1).mean() for i, y in zip(layers, ys)]
    return (torch.stack(err).mean() / TINY["hidden_size"] ** 0.5).item()


def test_channel_features_sum_to_time_mix_output(teacher):
    student = qrwkv.student_from_teacher(teacher).float()
    tm = student.model.layers[1].self_attn
    with torch.no_grad():   # non-trivial gate and decays, so the sum checks them too
        tm.gate.weight.normal_(0, 0.3)
        tm.time_decay.uniform_(-4, 1)
    rec = calibrate.capture_attention_io(teacher, batches(1, 5), [1])[1]
    y, h, r, k, v, log_w, g = calibrate.student_pieces(tm, rec["x"][0], rec["cos"][0], rec["sin"][0])
    F = calibrate.channel_features(r.double(), k.double(), v.double(), log_w.double(), g.double())
    torch.testing.assert_close(F.sum(3).float(), h, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(tm.o_proj(F.sum(3).flatten(2).float()), y, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("options", [dict(), dict(decay="distance"), dict(decay="spec", readout="head")])
def test_calibration_lowers_held_out_alignment_loss(teacher, options):
    plain = qrwkv.student_from_teacher(teacher).float()
    student = qrwkv.student_from_teacher(teacher).float()
    report = calibrate.calibrate_student(student, teacher, batches(4, 1), **options)
    assert max(a - b for a, b in zip(report["rel_err_after"], report["rel_err_before"])) < 0
    held_out = batches(2, 2)
    # (llama: 0.72 vs 1.04; qwen3's random heads attend by content, which no decayed linear attention matches: 0.684 vs 0.689)
    margin = 0.8 if teacher.config.model_type == "llama" else 1.0
    assert step0_loss(student, teacher, held_out) < margin * step0_loss(plain, teacher, held_out)


@pytest.mark.parametrize("decay", ["distance", "search"])
def test_bf16_teacher_calibrates_like_fp32(teacher, decay):
    """convert.py --dtype bfloat16 (the default where bf16 is native) hands calibration a bf16 teacher and an fp32
    student: the same decays and nearly the same calibrated student as with the fp32 teacher."""
    teacher16 = qrwkv.QRWKV(teacher.config).to(torch.bfloat16)
    teacher16.load_state_dict(teacher.state_dict())
    s32, s16 = (qrwkv.student_from_teacher(teacher).float() for _ in range(2))
    r32 = calibrate.calibrate_student(s32, teacher, batches(2, 1), decay=decay)
    r16 = calibrate.calibrate_student(s16, teacher16, batches(2, 1), decay=decay)
    assert r16["decay_centres"].keys() == r32["decay_centres"].keys()
    assert max(abs(a - b) for i in r32["decay_centres"] for a, b in zip(r16["decay_centres"][i], r32["decay_centres"][i])) < 0.1
    assert max(a - b for a, b in zip(r16["rel_err_after"], r16["rel_err_before"])) < 0
    assert r16["rel_err_after"] == pytest.approx(r32["rel_err_after"], rel=0.05)


def test_saved_and_reloaded_logits_identical(teacher, tmp_path):
    student = qrwkv.student_from_teacher(teacher).float()
    calibrate.calibrate_student(student, teacher, batches(2, 3))
    qrwkv.save_model(student, str(tmp_path / "cal"))
    again = qrwkv.load_model(str(tmp_path / "cal"), dtype=torch.float32)
    ids = batches(1, 4)[0]
    with torch.no_grad():
        torch.testing.assert_close(again(ids)[0], student(ids)[0], atol=0, rtol=0)


def test_only_time_mix_blocks_change(teacher):
    before_teacher, wkv6 = {n: p.clone() for n, p in teacher.state_dict().items()}, qrwkv.wkv6
    student = qrwkv.student_from_teacher(teacher, attention_layers=(1,)).float()
    before = {n: p.clone() for n, p in student.state_dict().items()}
    report = calibrate.calibrate_student(student, teacher, batches(2, 6))
    assert report["layers"] == [0, 2]
    changed = {n for n, p in student.state_dict().items() if not torch.equal(p, before[n])}
    allowed = ("self_attn.time_decay", "self_attn.q_proj", "self_attn.o_proj")
    assert changed and all(n.startswith(("model.layers.0.", "model.layers.2.")) and any(a in n for a in allowed) for n in changed)
    assert all(torch.equal(p, before_teacher[n]) for n, p in teacher.state_dict().items())
    assert qrwkv.wkv6 is wkv6
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in teacher.modules())


def test_rejects_a_trained_time_mix(teacher):
    student = qrwkv.student_from_teacher(teacher).float()
    with torch.no_grad():
        student.model.layers[2].self_attn.gate.weight.fill_(0.1)
    with pytest.raises(ValueError, match="layer 2: time-mix is not at its SPEC"):
        calibrate.calibrate_student(student, teacher, batches(1, 7))


def test_ridge_refit_is_the_regularised_least_squares():
    """ridge_refit_ against an independent solve: lstsq of the stacked system [H; √ρ I] Wᵀ = [Y; √ρ W0ᵀ]."""
    g = torch.Generator().manual_seed(8)
    lin = torch.nn.Linear(12, 7, bias=False).double()
    W0 = lin.weight.detach().clone()
    pairs = [(torch.randn(3, 20, 12, generator=g, dtype=torch.float64), torch.randn(3, 20, 7, generator=g, dtype=torch.float64))
             for _ in range(2)]
    calibrate.ridge_refit_(lin, pairs, 0.1)
    H, Y = (torch.cat([p[j].reshape(-1, p[j].shape[-1]) for p in pairs]) for j in (0, 1))
    rho = 0.1 * (H * H).sum(0).mean()
    ref = torch.linalg.lstsq(torch.cat([H, rho.sqrt() * torch.eye(12, dtype=H.dtype)]), torch.cat([Y, rho.sqrt() * W0.T])).solution.T
    torch.testing.assert_close(lin.weight.detach(), ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("groupnorm_att", [True, False])
def test_rwkv7_calibration_lowers_held_out_error_and_changes_only_gate_and_amplitude(teacher, groupnorm_att):
    """calibrate_rwkv7: every TimeMix7's gate set to 1 and its output amplitude fitted per channel; each layer's
    relative error to the teacher's attention falls on the calibration tokens and on tokens it never saw; only g2
    and ln_x (without GroupNorm: o_proj) change."""
    L = TINY["num_hidden_layers"]
    student = qrwkv.student_from_teacher(teacher, attention_layers=(L - 1,), student="rwkv7", groupnorm_att=groupnorm_att).float()
    before = {n: p.clone() for n, p in student.state_dict().items()}
    held_out = calibrate.capture_attention_io(teacher, batches(2, 11), range(L - 1))
    err = lambda: [calibrate.rwkv7_relative_error(student, held_out, i) for i in range(L - 1)]
    held_before = err()
    report = calibrate.calibrate_rwkv7(student, teacher, batches(8, 10), decay="spec")
    assert report["layers"] == list(range(L - 1))
    assert all(a < b for a, b in zip(report["rel_err_after"], report["rel_err_before"])), report
    assert all(a < b for a, b in zip(err(), held_before)), (err(), held_before)
    changed = {n for n, p in student.state_dict().items() if not torch.equal(p, before[n])}
    fitted = ("ln_x.weight", "ln_x.bias") if groupnorm_att else ("o_proj.weight",)
    assert changed == {f"model.layers.{i}.self_attn.{n}" for i in range(L - 1) for n in ("g2",) + fitted}
    for i in range(L - 1):   # the fresh gate 0.5 · 1ᵀ g2 is now 1 in every channel
        torch.testing.assert_close(0.5 * student.model.layers[i].self_attn.g2.sum(0), torch.ones(TINY["hidden_size"]))


def test_channel_affine_is_the_per_channel_ridge_least_squares():
    """channel_affine against an independent solve per channel: lstsq of [h 1; √(nρ) 0] (s, β) = [z; 0]
    (with intercept=False: [h; √(nρ)] s = [z; 0], ρ from the uncentred second moment)."""
    g = torch.Generator().manual_seed(9)
    pairs = [(torch.randn(3, 20, 5, generator=g, dtype=torch.float64) + 0.5,
              torch.randn(3, 20, 5, generator=g, dtype=torch.float64)) for _ in range(2)]
    pairs = [(h, 0.7 * h - 0.2 + z) for h, z in pairs]
    H, Z = (torch.cat([p[j].reshape(-1, 5) for p in pairs]) for j in (0, 1))
    n = H.shape[0]
    for intercept in (True, False):
        s, beta, _ = calibrate.channel_affine(pairs, 0.1, intercept=intercept)
        second = H.var(0, correction=0) if intercept else H.pow(2).mean(0)
        rho = 0.1 * second.mean()
        for c in range(5):
            design = torch.stack([H[:, c], torch.ones(n, dtype=H.dtype)], 1) if intercept else H[:, c:c + 1]
            reg = torch.zeros(1, design.shape[1], dtype=H.dtype)
            reg[0, 0] = (n * rho).sqrt()
            sol = torch.linalg.lstsq(torch.cat([design, reg]), torch.cat([Z[:, c], torch.zeros(1, dtype=H.dtype)])).solution
            torch.testing.assert_close(s[c], sol[0], rtol=1e-9, atol=1e-12)
            torch.testing.assert_close(beta[c], sol[1] if intercept else torch.zeros((), dtype=H.dtype), rtol=1e-9, atol=1e-12)


def test_rwkv7_calibration_refuses_a_trained_gate(teacher):
    L = TINY["num_hidden_layers"]
    student = qrwkv.student_from_teacher(teacher, attention_layers=(L - 1,), student="rwkv7").float()
    with torch.no_grad():
        student.model.layers[1].self_attn.g1.fill_(0.1)
    with pytest.raises(ValueError, match="layer 1: the gate is trained"):
        calibrate.calibrate_rwkv7(student, teacher, batches(1, 7))


def test_rwkv7_refit_refuses_an_rwkv6_student(teacher):
    with pytest.raises(ValueError, match="not an rwkv7"):
        calibrate.calibrate_rwkv7(qrwkv.student_from_teacher(teacher).float(), teacher, batches(1, 12))


def test_rwkv7_decay_search_sets_w0_on_the_grid_and_fits_no_worse(teacher):
    """decay="search": each head's w0 centre comes from RWKV7_DECAY_GRID, and the calibration-token error is no
    worse than with the SPEC decay (the SPEC profile is not on the grid, so this is a real comparison per layer)."""
    L = TINY["num_hidden_layers"]
    make = lambda: qrwkv.student_from_teacher(teacher, attention_layers=(L - 1,), student="rwkv7").float()
    torch.manual_seed(0)
    spec = calibrate.calibrate_rwkv7(make(), teacher, batches(4, 10), decay="spec")
    torch.manual_seed(0)
    student = make()
    searched = calibrate.calibrate_rwkv7(student, teacher, batches(4, 10), decay="search", search_batches=4)
    assert sum(searched["rel_err_after"]) < sum(spec["rel_err_after"]) * 1.02, (searched, spec)
    for i in range(L - 1):
        w0 = student.model.layers[i].self_attn.w0.view(TINY["num_attention_heads"], -1)
        centres = w0.mean(-1)
        assert all(min(abs(c - g) for g in calibrate.RWKV7_DECAY_GRID) < 1e-5 for c in centres.tolist()), centres
    with pytest.raises(ValueError, match="decay must be"):
        calibrate.calibrate_rwkv7(make(), teacher, batches(1, 10), decay="distance")
