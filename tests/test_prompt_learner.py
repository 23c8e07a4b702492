"""The CoOp prompt learner on a tiny randomly initialised open_clip model (no downloaded weights)."""

import open_clip
import pytest
import torch
import torch.nn.functional as F

from upa.baselines.prompt_learner import PromptLearner, PromptTraining, train_prompt_learner

CLASSNAMES = ("red fox", "cat", "golden retriever")


@pytest.fixture(scope="module")
def tiny_clip(tiny_arch):
    torch.manual_seed(0)
    model = open_clip.create_model(tiny_arch, pretrained=None).eval()
    return model, open_clip.get_tokenizer(tiny_arch)


def test_prompt_learner_shapes(tiny_clip):
    model, tokenizer = tiny_clip
    learner = PromptLearner(model, tokenizer, CLASSNAMES, n_ctx=16)
    assert learner.ctx.shape == (16, 64)
    assert learner.prompt_embeddings().shape[:2] == (3, learner.token_ids.shape[1])
    assert learner().shape == (3, 32)
    torch.testing.assert_close(learner.class_embeddings().norm(dim=-1), torch.ones(3))


def test_prompt_learner_parameters_are_context_only(tiny_clip):
    model, tokenizer = tiny_clip
    learner = PromptLearner(model, tokenizer, CLASSNAMES)
    assert [name for name, _ in learner.named_parameters()] == ["ctx"]


def test_prompt_learner_gradient_reaches_only_context(tiny_clip):
    model, tokenizer = tiny_clip
    learner = PromptLearner(model, tokenizer, CLASSNAMES)
    images = F.normalize(torch.randn(5, 32, generator=torch.Generator().manual_seed(1)), dim=-1)
    loss = F.cross_entropy(10.0 * images @ learner.class_embeddings().t(), torch.tensor([0, 1, 2, 0, 1]))
    loss.backward()
    assert learner.ctx.grad is not None
    assert learner.ctx.grad.abs().sum() > 0
    assert [name for name, p in model.named_parameters() if p.grad is not None] == []


def test_prompt_learner_matches_encode_text(tiny_clip):
    # With the context set to the embeddings of "a photo of a", the learner must reproduce
    # open_clip's own encode_text of the full prompt: an independent check of the forward.
    model, tokenizer = tiny_clip
    learner = PromptLearner(model, tokenizer, CLASSNAMES, n_ctx=4, ctx_init="a photo of a")
    with torch.no_grad():
        expected = model.encode_text(tokenizer([f"a photo of a {name}." for name in CLASSNAMES]))
        got = learner()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_prompt_learner_ctx_init_token_count_checked(tiny_clip):
    model, tokenizer = tiny_clip
    with pytest.raises(ValueError, match="n_ctx=5"):
        PromptLearner(model, tokenizer, CLASSNAMES, n_ctx=5, ctx_init="a photo of a")


def test_prompt_learner_rejects_overlong_prompt(tiny_clip):
    model, tokenizer = tiny_clip
    with pytest.raises(ValueError, match="needs .* tokens"):
        PromptLearner(model, tokenizer, ("word " * 70,), n_ctx=16)


def test_prompt_learner_custom_text_tower_rejected():
    class HuggingFaceLikeModel(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.text = torch.nn.Linear(2, 2)

    with pytest.raises(NotImplementedError, match="Linear"):
        PromptLearner(HuggingFaceLikeModel(), None, CLASSNAMES)


def _train_once(model, tokenizer, seed):
    learner = PromptLearner(model, tokenizer, CLASSNAMES, generator=torch.Generator().manual_seed(seed))
    features = F.normalize(torch.randn(12, 2, 32, generator=torch.Generator().manual_seed(3)), dim=-1)
    labels = torch.arange(3).repeat(4)
    training = PromptTraining(epochs=3, batch_size=4, lr=0.05, warmup_epochs=0)
    losses = train_prompt_learner(learner, features, labels, 20.0, training,
                                  torch.Generator().manual_seed(seed), progress=False)
    return learner.ctx.detach().clone(), losses


def test_train_prompt_learner_seeded(tiny_clip):
    model, tokenizer = tiny_clip
    first, first_losses = _train_once(model, tokenizer, seed=7)
    second, second_losses = _train_once(model, tokenizer, seed=7)
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    assert first_losses == second_losses


def test_train_prompt_learner_lowers_loss(tiny_clip):
    model, tokenizer = tiny_clip
    initial = PromptLearner(model, tokenizer, CLASSNAMES, generator=torch.Generator().manual_seed(7)).ctx
    trained, losses = _train_once(model, tokenizer, seed=7)
    assert not torch.equal(initial.detach(), trained)
    assert losses[-1] < losses[0]


def test_train_prompt_learner_non_finite_loss_raises(tiny_clip):
    model, tokenizer = tiny_clip
    learner = PromptLearner(model, tokenizer, CLASSNAMES)
    features = F.normalize(torch.randn(3, 32, generator=torch.Generator().manual_seed(0)), dim=-1)
    with pytest.raises(FloatingPointError, match="non-finite"):
        train_prompt_learner(learner, features, torch.tensor([0, 1, 2]), float("inf"),
                             PromptTraining(epochs=1), progress=False)
