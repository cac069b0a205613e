"""Metrics against closed forms and independent references (numpy/scipy, the CLIPModel forward)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch
from torch import nn

from dopsd_bench.metrics import scores as S
from dopsd_bench.metrics.cache import SampleCache
from dopsd_bench.metrics.features import (
    ClipFeatures,
    DinoFeatures,
    FeatureExtractor,
    JudgeFeatures,
    RealImageFeatures,
)
from dopsd_bench.metrics.frechet import fd_metric, frechet_distance, kernel_distance
from dopsd_bench.metrics.teacher import references_for, teacher_student_divergence
from dopsd_bench.taskdata import TaskData
from dopsd_bench.world.render import ATTRIBUTES


def _exact_gaussian(mu: torch.Tensor, cov: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """n points whose sample mean and unbiased sample covariance are exactly mu and cov."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, mu.shape[0], generator=g, dtype=torch.float64)
    z = z - z.mean(0)
    emp = z.T @ z / (n - 1)
    z = z @ torch.linalg.inv(torch.linalg.cholesky(emp)).T  # whiten: sample covariance = I
    return mu + z @ torch.linalg.cholesky(cov).T


def _scipy_fd(a: np.ndarray, b: np.ndarray) -> float:
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


# ---- Fréchet distance and KID -------------------------------------------------------------------------------


def test_fd_of_a_set_with_itself_is_zero():
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(0))
    assert abs(frechet_distance(x, x)) < 1e-6


def test_fd_of_two_known_gaussians_is_the_analytic_value():
    d = 5
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    s1 = q @ torch.diag(torch.tensor([1.0, 2.0, 0.5, 3.0, 1.5], dtype=torch.float64)) @ q.T
    s2 = 4.0 * s1  # commutes with s1: sqrt(s1 s2) = 2 s1
    mu1 = torch.zeros(d, dtype=torch.float64)
    mu2 = torch.tensor([1.0, -2.0, 0.0, 0.5, 3.0], dtype=torch.float64)
    analytic = float((mu1 - mu2).square().sum() + torch.trace(s1 + s2 - 2 * 2.0 * s1))
    fd = frechet_distance(_exact_gaussian(mu1, s1, 200, 2), _exact_gaussian(mu2, s2, 300, 3))
    assert fd == pytest.approx(analytic, rel=1e-6)
    # diagonal, non-proportional covariances: sum_i (sqrt(a_i) - sqrt(b_i))^2 in the trace term
    a, b = torch.tensor([1.0, 4.0, 9.0]), torch.tensor([4.0, 1.0, 1.0])
    analytic = 2.0 ** 2 + float(((a.sqrt() - b.sqrt()) ** 2).sum())
    x = _exact_gaussian(torch.zeros(3, dtype=torch.float64), torch.diag(a).double(), 100, 4)
    y = _exact_gaussian(torch.tensor([2.0, 0, 0], dtype=torch.float64), torch.diag(b).double(), 100, 5)
    assert frechet_distance(x, y) == pytest.approx(analytic, rel=1e-6)


def test_fd_agrees_with_scipy_sqrtm():
    g = torch.Generator().manual_seed(3)
    a = torch.randn(80, 16, generator=g)
    b = torch.randn(60, 16, generator=g) @ torch.randn(16, 16, generator=g) * 0.5 + 0.3
    ours, ref = frechet_distance(a, b), _scipy_fd(a.double().numpy(), b.double().numpy())
    assert ours == pytest.approx(ref, rel=1e-3)


def test_fd_metric_over_images_equals_fd_over_embeddings():
    class Pool(FeatureExtractor):
        name = "pool"

        def embed(self, images):
            return torch.nn.functional.avg_pool2d(images, 4).flatten(1)

    g = torch.Generator().manual_seed(4)
    real, fake = torch.rand(20, 3, 8, 8, generator=g) * 2 - 1, torch.rand(24, 3, 8, 8, generator=g) * 1.5 - 1
    metric = fd_metric(Pool(), num_features=12)
    metric.update(real, real=True)
    metric.update(fake, real=False)
    ext = Pool()
    assert float(metric.compute()) == pytest.approx(frechet_distance(ext.embed(real), ext.embed(fake)), rel=1e-9)


def test_fd_rejects_too_few_samples():
    with pytest.raises(ValueError, match="at least 2"):
        frechet_distance(torch.randn(1, 4), torch.randn(5, 4))


def test_kid_matches_numpy_polynomial_mmd_and_is_deterministic():
    g = torch.Generator().manual_seed(5)
    a, b = torch.randn(30, 6, generator=g), torch.randn(30, 6, generator=g) + 0.5
    x, y = a.double().numpy(), b.double().numpy()
    k = lambda u, v: (u @ v.T / 6 + 1) ** 3  # torchmetrics' default polynomial kernel
    n = 30
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    ref = ((kxx.sum() - np.trace(kxx)) + (kyy.sum() - np.trace(kyy))) / (n * (n - 1)) - 2 * kxy.mean()
    kid, _ = kernel_distance(a, b)
    assert kid == pytest.approx(ref, rel=1e-6)
    assert kernel_distance(a, b) == kernel_distance(a, b)
    c = torch.randn(40, 6, generator=g)  # unequal sizes: random subsets, from a fixed seed
    assert kernel_distance(a, c) == kernel_distance(a, c)


# ---- per-sample scores --------------------------------------------------------------------------------------


def test_reference_fidelity_of_references_against_themselves_is_one():
    refs = torch.randn(6, 10, generator=torch.Generator().manual_seed(6))
    for i in range(6):  # each reference scored against itself
        assert float(S.reference_similarity(refs[i:i + 1], refs[i:i + 1])) == pytest.approx(1.0, abs=1e-12)
    same = refs[:1].repeat(4, 1)  # a reference set of one image, repeated: the matrix mean is 1
    assert torch.allclose(S.reference_similarity(same, same), torch.ones(4, dtype=torch.float64))
    assert torch.allclose(S.nearest_similarity(refs, refs), torch.ones(6, dtype=torch.float64))


def test_reference_similarity_is_the_dreambench_matrix_mean():
    g = torch.Generator().manual_seed(7)
    gen, refs = torch.randn(5, 8, generator=g), torch.randn(3, 8, generator=g)
    x, r = gen.double().numpy(), refs.double().numpy()
    cos = np.array([[xi @ rj / np.linalg.norm(xi) / np.linalg.norm(rj) for rj in r] for xi in x])
    assert np.allclose(S.reference_similarity(gen, refs).numpy(), cos.mean(1))
    assert float(S.reference_similarity(gen, refs).mean()) == pytest.approx(cos.mean())
    oracle = S.leave_one_out_similarity(refs).numpy()
    cr = np.array([[a @ b / np.linalg.norm(a) / np.linalg.norm(b) for b in r] for a in r])
    assert np.allclose(oracle, (cr.sum(1) - 1) / 2)


def _probs_for(targets: list[dict[str, str]], wrong: bool = False) -> dict[str, torch.Tensor]:
    out = {}
    for attr, labels in ATTRIBUTES.items():
        p = torch.full((len(targets), len(labels)), 0.01)
        for i, t in enumerate(targets):
            j = S.label_index(attr, t[attr])
            p[i, (j + 1) % len(labels) if wrong else j] = 1.0
        out[attr] = p / p.sum(1, keepdim=True)
    return out


TARGETS = [{"shape": "zorb", "colour": "red", "size": "small", "position": "left", "style": "solid",
            "background": "dark"},
           {"shape": "circle", "colour": "blue", "size": "large", "position": "top", "style": "dotted",
            "background": "light"}]


def test_alignment_is_one_when_right_and_zero_when_attributes_are_wrong():
    assert torch.equal(S.attribute_alignment(_probs_for(TARGETS), TARGETS), torch.ones(2, dtype=torch.float64))
    assert torch.equal(S.attribute_alignment(_probs_for(TARGETS, wrong=True), TARGETS),
                       torch.zeros(2, dtype=torch.float64))
    probs = _probs_for(TARGETS)
    probs["colour"] = _probs_for(TARGETS, wrong=True)["colour"]  # one of six attributes wrong
    assert torch.allclose(S.attribute_alignment(probs, TARGETS), torch.full((2,), 5 / 6, dtype=torch.float64))
    # excluding the wrong attribute, the rest are all found
    assert torch.equal(S.attribute_alignment(probs, TARGETS, exclude=("colour",)), torch.ones(2, dtype=torch.float64))
    partial = [{"shape": "ring"}, {"colour": "green", "size": "small"}]  # prompts that state fewer attributes
    full = [{**TARGETS[0], **partial[0]}, {**TARGETS[1], **partial[1]}]
    assert torch.equal(S.attribute_alignment(_probs_for(full), partial), torch.ones(2, dtype=torch.float64))


def test_attribute_accuracy_names_the_attribute_that_is_lost():
    probs = _probs_for(TARGETS)
    probs["shape"][0] = _probs_for(TARGETS, wrong=True)["shape"][0]  # the first prompt's shape is missed
    acc = S.attribute_accuracy(probs, TARGETS)
    assert acc == {"shape": 0.5, "colour": 1.0, "size": 1.0, "position": 1.0, "style": 1.0, "background": 1.0}
    # each attribute averages over the prompts that state it only
    assert S.attribute_accuracy(_probs_for([{**TARGETS[0], "shape": "ring"}, TARGETS[1]]),
                                [{"shape": "ring"}, {"colour": "blue"}]) == {"shape": 1.0, "colour": 1.0}


def test_label_index_maps_family_names_to_other():
    assert ATTRIBUTES["shape"][S.label_index("shape", "glyph:123")] == "other"
    assert S.label_index("shape", "zorb") == ATTRIBUTES["shape"].index("zorb")
    with pytest.raises(ValueError, match="expected one of"):
        S.label_index("colour", "purple")


def test_target_probability_and_clip_text_score_closed_forms():
    probs = torch.tensor([[0.2, 0.8], [0.6, 0.4]])
    assert torch.allclose(S.target_probability(probs, torch.tensor([1, 1])), torch.tensor([0.8, 0.4]).double())
    img = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 1.0]])
    txt = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]])
    assert torch.allclose(S.clip_text_score(img, txt), torch.tensor([100.0, 0.0, 100 / 2 ** 0.5]).double())


def test_diversity_closed_forms():
    same = torch.ones(4, 3)
    assert torch.allclose(S.pairwise_diversity(same), torch.zeros(4, dtype=torch.float64), atol=1e-12)
    ortho = torch.eye(3)
    assert torch.allclose(S.pairwise_diversity(ortho), torch.ones(3, dtype=torch.float64))
    emb = torch.tensor([[1.0, 0], [1.0, 0], [0, 1.0], [0, -1.0]])
    assert torch.allclose(S.pairwise_diversity(emb, ["a", "a", "b", "b"]),
                          torch.tensor([0.0, 0.0, 2.0, 2.0], dtype=torch.float64), atol=1e-12)
    assert S.diversity_groups(["p", "q", "p", "q"]) == ["p", "q", "p", "q"]
    assert S.diversity_groups(["p", "q", "p"]) is None
    with pytest.raises(ValueError, match="at least 2"):
        S.pairwise_diversity(emb, ["a", "a", "a", "b"])


def test_metric_classes_accumulate_per_sample_values():
    g = torch.Generator().manual_seed(8)
    refs, a, b = torch.randn(3, 5, generator=g), torch.randn(4, 5, generator=g), torch.randn(2, 5, generator=g)
    m = S.ReferenceSimilarity(refs)
    m.update(a)
    m.update(b)
    expect = torch.cat([S.reference_similarity(a, refs), S.reference_similarity(b, refs)])
    assert torch.allclose(m.per_sample(), expect)
    assert float(m.compute()) == pytest.approx(float(expect.mean()))
    m.reset()
    with pytest.raises(RuntimeError, match="update"):
        m.per_sample()
    c = S.Copying(refs)
    c.update(refs)
    assert torch.allclose(c.compute(), torch.tensor(1.0, dtype=torch.float64))
    d = S.Diversity()
    d.update(torch.eye(2))
    d.update(torch.eye(2)[:1] * -1)
    assert torch.allclose(d.per_sample(), torch.tensor([1.5, 1.0, 1.5], dtype=torch.float64))
    al = S.AttributeAlignment(exclude=("shape",))
    al.update(_probs_for(TARGETS), TARGETS)
    assert float(al.compute()) == 1.0
    tp = S.TargetProbability()
    tp.update(torch.tensor([[0.3, 0.7]]), torch.tensor([0]))
    assert float(tp.compute()) == pytest.approx(0.3)


# ---- feature backbones --------------------------------------------------------------------------------------


class FakeJudge(nn.Module):
    """Stands in for WorldJudge: a fixed random conv embedding + attribute heads; works at any resolution."""

    def __init__(self, dim: int = 12, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(3, dim, 3, padding=1)
        self.heads = nn.ModuleDict({k: nn.Linear(dim, len(v)) for k, v in ATTRIBUTES.items()})

    def embed(self, images):
        return torch.nn.functional.adaptive_avg_pool2d(torch.tanh(self.conv(images)), 1).flatten(1)

    def forward(self, images):
        e = self.embed(images)
        return {k: h(e) for k, h in self.heads.items()}


def test_judge_features_with_the_real_world_judge():
    from dopsd_bench.world.judge import WorldJudge

    feats = JudgeFeatures(WorldJudge(width=8, embed_dim=16), batch_size=3)
    images = torch.rand(5, 3, 32, 32) * 2 - 1
    emb = feats.embed(images)
    assert emb.shape == (5, 16)
    assert torch.allclose(emb, feats.judge.embed(images), atol=1e-6)  # batching changes nothing
    probs = feats.attributes(images)
    assert set(probs) == set(ATTRIBUTES)
    for attr, p in probs.items():
        assert p.shape == (5, len(ATTRIBUTES[attr]))
        assert torch.allclose(p.sum(1), torch.ones(5), atol=1e-5)
    one_pass = feats.extract(images)  # embed_and_logits: one trunk pass gives the same views
    assert torch.allclose(one_pass.embedding, emb, atol=1e-6)
    assert one_pass.similarity == {"judge": one_pass.embedding}
    assert all(torch.allclose(one_pass.attributes[k], probs[k], atol=1e-6) for k in ATTRIBUTES)
    fallback = JudgeFeatures(FakeJudge()).extract(images)  # a judge without embed_and_logits
    assert fallback.embedding.shape == (5, 12) and set(fallback.attributes) == set(ATTRIBUTES)
    with pytest.raises(ValueError, match="B, 3, H, W"):
        feats.embed(torch.zeros(3, 32, 32))


def _tiny_clip():
    from transformers import CLIPConfig, CLIPModel

    from dopsd_bench.backbones.tiny import bpe_tokenizer

    tok = bpe_tokenizer(["a red circle", "a blue square at the top", "a photo of a dog"] * 5, vocab_size=300)
    tok.pad_token = tok.pad_token or "<|endoftext|>"
    torch.manual_seed(0)
    cfg = CLIPConfig(
        text_config={"vocab_size": len(tok), "hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "max_position_embeddings": 32, "eos_token_id": 2},
        vision_config={"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8},
        projection_dim=16)
    return CLIPModel(cfg).eval(), tok


def _tiny_dino():
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    return Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37,
                                    image_size=32, patch_size=8)).eval()


def test_clip_t_matches_the_clip_model_forward(tmp_path):
    model, tok = _tiny_clip()
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    clip = ClipFeatures.from_pretrained(tmp_path, batch_size=2)
    images = torch.rand(3, 3, 32, 32) * 2 - 1
    prompts = ["a red circle", "a blue square at the top", "a photo of a dog"]
    ours = clip.text_scores(images, prompts)
    # independent reference: CLIPModel's own forward gives logit_scale * cos on the same inputs
    from dopsd_bench.metrics.features import CLIP_MEAN, CLIP_STD, _preprocess

    pix = _preprocess(images, 32, CLIP_MEAN, CLIP_STD, "cpu", torch.float32)
    ids = tok(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"], pixel_values=pix)
    cos = out.logits_per_image.diagonal() / model.logit_scale.exp()
    assert torch.allclose(ours, 100 * cos.clamp(min=0).double(), atol=1e-3)
    assert ((ours >= 0) & (ours <= 100)).all()
    assert clip.embed(images).shape == (3, 16)
    with pytest.raises(ValueError, match="one prompt per image"):
        clip.text_scores(images, prompts[:2])


def test_dino_and_real_image_features(tmp_path):
    model = _tiny_dino()
    model.save_pretrained(tmp_path)
    dino = DinoFeatures.from_pretrained(tmp_path, resolution=32, batch_size=2)
    images = torch.rand(3, 3, 16, 16) * 2 - 1  # resized to 32 inside
    emb = dino.embed(images)
    assert emb.shape == (3, 32)
    clip_model, tok = _tiny_clip()
    real = RealImageFeatures(dino, ClipFeatures(clip_model, tok))
    sims = real.similarity_embeddings(images)
    assert set(sims) == {"dino", "clip_i"} and torch.allclose(sims["dino"], emb)
    assert real.attributes(images) is None
    assert real.text_scores(images, ["a", "b", "c"]).shape == (3,)
    from dopsd_bench.errors import UserError

    with pytest.raises(UserError, match="offline.*Pass --dino PATH \\(or set DOPSD_BENCH_DINO\\)"):
        DinoFeatures.from_pretrained(tmp_path / "missing")


def test_folder_tasks_find_their_scorers_from_the_environment(tmp_path, monkeypatch):
    from dopsd_bench.metrics.features import features_for_task

    _tiny_dino().save_pretrained(tmp_path / "dino")
    task = TaskData(task="dog", family="concept", instance="dog", token="sks",
                    train_images=torch.zeros(2, 3, 16, 16), train_captions=["a sks dog"] * 2,
                    eval_prompts=["a sks dog"] * 2, eval_seeds=[0, 1], retention_prompts=["a cat"] * 2,
                    retention_seeds=[2, 3])
    monkeypatch.setenv("DOPSD_BENCH_DINO", str(tmp_path / "dino"))
    monkeypatch.setenv("DOPSD_BENCH_CLIP", "none")
    feats = features_for_task(task)
    assert isinstance(feats.dino, DinoFeatures) and feats.clip is None
    monkeypatch.setenv("DOPSD_BENCH_CLIP", str(tmp_path / "no-clip-here"))
    from dopsd_bench.errors import UserError

    with pytest.raises(UserError, match="--clip none to score without CLIP"):
        features_for_task(task)


def test_the_world_judge_reads_images_of_any_resolution_at_its_own():
    from dopsd_bench.world.judge import WorldJudge

    feats = JudgeFeatures(WorldJudge(width=8, embed_dim=16))
    images = torch.rand(3, 3, 32, 32) * 2 - 1
    large = torch.nn.functional.interpolate(images, size=(128, 128), mode="nearest")  # a 128 px backbone's images
    torch.testing.assert_close(feats.embed(large), feats.embed(images))


# ---- cache and teacher diagnostics --------------------------------------------------------------------------


class _Id:
    name = "idtest"
    model_id = "m1"
    resolution = 16


def test_sample_cache_round_trip_and_keys(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return torch.randn(2, 3, 4, 4)

    a = SampleCache(tmp_path, _Id()).get_or_compute("sample", ["p", "q"], [0, 1], 4, None, compute)
    b = SampleCache(tmp_path, _Id()).get_or_compute("sample", ["p", "q"], [0, 1], 4, None, compute)
    assert torch.equal(a, b) and len(calls) == 1  # a fresh cache object reads the file
    cache = SampleCache(tmp_path, _Id())
    keys = {cache.key("sample", ["p", "q"], [0, 1], 4, None), cache.key("sample", ["p", "q"], [0, 2], 4, None),
            cache.key("sample", ["p", "q"], [0, 1], 2, None), cache.key("sample", ["q", "p"], [0, 1], 4, None),
            cache.key("sample", ["p", "q"], [0, 1], 4, torch.zeros(2, 3, 4, 4)),
            cache.key("teacher_sample", ["p", "q"], [0, 1], 4, None)}
    assert len(keys) == 6
    other = _Id()
    other.model_id = "m2"
    assert SampleCache(tmp_path, other).key("sample", ["p"], [0], 4, None) != cache.key("sample", ["p"], [0], 4, None)
    mem = SampleCache(None, _Id())
    mem.get_or_compute("sample", ["p"], [0], 4, None, compute)
    mem.get_or_compute("sample", ["p"], [0], 4, None, compute)
    assert (mem.hits, mem.misses) == (1, 1)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "flip"])
def test_a_corrupt_cache_entry_is_named_deleted_and_computed_again(tmp_path, capsys, damage):
    value = torch.randn(2, 3, 4, 4)
    cache = SampleCache(tmp_path, _Id())
    cache.get_or_compute("sample", ["p", "q"], [0, 1], 4, None, lambda: value)
    (path,) = tmp_path.glob("*.safetensors")
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "garbage":
        data = bytearray(b"not a safetensors file")
    else:  # a flipped byte in the tensor's data: readable, but not what was written
        data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    again = SampleCache(tmp_path, _Id()).get_or_compute("sample", ["p", "q"], [0, 1], 4, None, lambda: value * 1)
    assert torch.equal(again, value)
    err = capsys.readouterr().err
    assert f"sample cache entry {path} is corrupt" in err and "computing it again" in err
    assert torch.equal(SampleCache(tmp_path, _Id()).get_or_compute("sample", ["p", "q"], [0, 1], 4, None,
                                                                   lambda: pytest.fail("healed")), value)


def test_teacher_student_divergence_closed_forms():
    from helpers_train import FakeBackbone

    bb = FakeBackbone()
    prompts, seeds = ["a red circle", "a blue ring"], [0, 1]
    # FakeBackbone's teacher adds the reference's latents to the text features: a zero reference changes nothing
    zero = torch.zeros(2, 3, 16, 16)
    d0 = teacher_student_divergence(bb, prompts, seeds, zero, student=None, teacher=None)
    assert torch.allclose(d0, torch.zeros(2, dtype=torch.float64))
    refs = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    d = teacher_student_divergence(bb, prompts, seeds, refs, student=None, teacher=None)
    # independent loop: explicit roll-out and x0 predictions
    sig = bb.sigmas(bb.native_steps)
    x, total = bb.noise(seeds), torch.zeros(2, dtype=torch.float64)
    for i in range(len(sig) - 1):
        s = sig[i].expand(2)
        v = bb.predict_velocity(x, s, bb.encode_prompts(prompts))
        xt = bb.predict_x0(x, s, bb.encode_teacher(prompts, refs))
        total += ((x - s.view(-1, 1, 1, 1) * v) - xt).double().pow(2).mean((1, 2, 3))
        x = x + (sig[i + 1] - sig[i]) * v
    assert torch.allclose(d, total / (len(sig) - 1)) and (d > 0).all()
    assert torch.equal(references_for(refs, 5)[4], refs[0])


def test_non_finite_features_are_refused_with_a_message_not_a_crash():
    from dopsd_bench.errors import NonFiniteError
    from dopsd_bench.metrics.frechet import frechet_distance, kernel_distance

    real = torch.randn(16, 8)
    fake = torch.randn(16, 8)
    fake[3, 2] = float("nan")
    fake[5] = float("inf")
    with pytest.raises(NonFiniteError, match=r"sample features hold NaN or inf \(2 of 16\)"):
        frechet_distance(real, fake)
    with pytest.raises(NonFiniteError, match="reference features"):
        kernel_distance(fake, real)
