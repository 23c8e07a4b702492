"""A CoOp prompt learner on open_clip's text encoder, trained on cached image features.

CoOp (Zhou et al., IJCV 2022; github.com/KaiyangZhou/CoOp) replaces the words of a prompt
template with n_ctx context vectors shared by all classes and learns them through the frozen
text encoder. The class name comes last:

    [SOS] ctx_1 … ctx_16 <class name tokens> . [EOS]

UPL (Huang et al., 2022; github.com/tonyhuang2022/UPL) trains the same learner on CLIP's
pseudo-labels instead of labelled shots. Published recipe (CoOp ``configs/trainers/CoOp/*.yaml``,
UPL ``configs/trainers/UPLTrainer/rn50_ep50.yaml``, the weight decay and momentum from Dassl's
defaults): 16 context vectors drawn from N(0, 0.02²), SGD lr 0.002, momentum 0.9, weight decay
5e-4, batch 32, one warm-up epoch at a constant lr of 1e-5, then cosine over the epochs; 200
epochs for CoOp with 8 or 16 shots, 50 for UPL.

Here the image side reads cached features instead of encoding images every step, so the
per-step augmentation of those repositories becomes one cached augmented view drawn at random.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from open_clip.transformer import TextTransformer, text_global_pool

from upa.method import fit_on_cached_views

log = logging.getLogger(__name__)

# CoOp builds its prompts from this placeholder word and then overwrites its embeddings.
PLACEHOLDER = "X"


@dataclass(frozen=True)
class PromptTraining:
    """Optimiser settings of the prompt learner; the defaults are UPL's (50 epochs).

    CoOp's supervised recipe differs only in the epoch count (200 for 8 or 16 shots).
    """

    epochs: int = 50
    lr: float = 0.002
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 32
    warmup_epochs: int = 1
    warmup_lr: float = 1e-5


@dataclass(frozen=True)
class _TextTower:
    """References to the frozen parts of an open_clip text encoder, outside any nn.Module tree."""

    token_embedding: torch.nn.Embedding
    positional_embedding: torch.Tensor
    transformer: torch.nn.Module
    ln_final: torch.nn.Module
    text_projection: torch.nn.Module | torch.Tensor | None
    attn_mask: torch.Tensor | None
    pool_type: str
    eos_id: int | None


def _text_tower(model: torch.nn.Module) -> _TextTower:
    """Find the text encoder parts that ``encode_text`` uses; raise for towers this learner cannot drive."""
    if hasattr(model, "token_embedding") and hasattr(model, "transformer"):
        owner = model  # open_clip.model.CLIP keeps the text tower's parts on the model itself
    elif isinstance(getattr(model, "text", None), TextTransformer):
        owner = model.text  # CustomTextCLIP with open_clip's own text transformer
        if owner.cls_emb is not None or owner.use_pad_mask:
            raise NotImplementedError(
                "this text tower appends a class token or masks padding (CoCa-style); the prompt "
                "learner supports open_clip text towers without them"
            )
    else:
        kind = type(getattr(model, "text", model)).__name__
        raise NotImplementedError(
            f"the prompt learner drives open_clip's own text transformer, but this model's text "
            f"tower is {kind} (for example a Hugging Face encoder); choose an architecture with a "
            f"built-in text tower such as ViT-B-32 or RN50"
        )
    return _TextTower(
        token_embedding=owner.token_embedding,
        positional_embedding=owner.positional_embedding,
        transformer=owner.transformer,
        ln_final=owner.ln_final,
        text_projection=owner.text_projection,
        attn_mask=owner.attn_mask,
        pool_type=getattr(owner, "text_pool_type", getattr(owner, "pool_type", "argmax")),
        eos_id=getattr(owner, "text_eos_id", getattr(owner, "eos_id", None)),
    )


def _placeholder_start(token_ids: torch.Tensor, n_ctx: int) -> int:
    """Return the position of the run of n_ctx equal placeholder ids that opens every prompt."""
    first = token_ids[0]
    for start in range(len(first) - n_ctx + 1):
        window = token_ids[:, start : start + n_ctx]
        if bool((window == window[:, :1]).all()) and bool((window[:, 0] == first[start]).all()):
            return start
    raise ValueError(f"could not find {n_ctx} placeholder tokens in the tokenized prompts")


class PromptLearner(torch.nn.Module):
    """n_ctx context vectors [n_ctx, width] shared by all C classes, read through a frozen text encoder.

    ``model`` is an open_clip CLIP model and ``tokenizer`` its tokenizer. The text encoder's
    parameters are set to ``requires_grad=False`` (the project never trains the encoder) and are
    not registered here, so ``parameters()`` yields the context only. ``ctx_init`` (for example
    "a photo of a") starts the context from the embeddings of those words. Their token count
    must equal n_ctx. Without it the context is drawn from N(0, 0.02²) with ``generator``.

    ``forward()`` returns the class embeddings [C, D], not normalised, in the text encoder's dtype.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer,
        classnames: Sequence[str],
        n_ctx: int = 16,
        ctx_init: str | None = None,
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        if n_ctx < 1:
            raise ValueError(f"n_ctx must be an integer >= 1 (number of context vectors), got {n_ctx}")
        if len(classnames) == 0:
            raise ValueError("classnames is empty; the prompt learner needs at least one class")
        self._tower = _text_tower(model)
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        self.n_ctx = n_ctx
        self.classnames = tuple(classnames)

        prompts = [" ".join([PLACEHOLDER] * n_ctx) + f" {name}." for name in self.classnames]
        _check_prompt_length(tokenizer, prompts, self.classnames)
        embedding = self._tower.token_embedding
        device = embedding.weight.device
        token_ids = tokenizer(prompts).to(device)
        start = _placeholder_start(token_ids, n_ctx)
        length = self._sequence_length(token_ids)
        token_ids = token_ids[:, :length]
        with torch.no_grad():
            embedded = embedding(token_ids)
        # prefix [C, start, width] and suffix [C, L − start − n_ctx, width] stay frozen around the context
        self.register_buffer("token_ids", token_ids, persistent=False)
        self.register_buffer("prefix", embedded[:, :start].clone(), persistent=False)
        self.register_buffer("suffix", embedded[:, start + n_ctx :].clone(), persistent=False)
        self.ctx = torch.nn.Parameter(self._initial_context(tokenizer, ctx_init, start, generator).to(device))

    def _sequence_length(self, token_ids: torch.Tensor) -> int:
        """Shorten the sequence to the last end token when nothing after it can reach the output.

        With a causal mask and pooling at the end-of-text token, later positions never influence
        the pooled feature, so dropping them leaves the output unchanged and saves most of the
        77-token cost. Other towers keep the full length.
        """
        tower = self._tower
        if tower.attn_mask is None or tower.pool_type not in ("argmax", "eos"):
            return token_ids.shape[1]
        if tower.pool_type == "argmax":
            ends = token_ids.argmax(dim=-1)
        else:
            ends = (token_ids == tower.eos_id).int().argmax(dim=-1)
        return int(ends.max()) + 1

    def _initial_context(self, tokenizer, ctx_init, start, generator) -> torch.Tensor:
        width = self._tower.token_embedding.weight.shape[1]
        if ctx_init is None:
            generator = generator if generator is not None else torch.Generator().manual_seed(0)
            return torch.randn(self.n_ctx, width, generator=generator) * 0.02
        device = self._tower.token_embedding.weight.device
        ids = tokenizer([ctx_init]).to(device)[0]
        placeholders = tokenizer([" ".join([PLACEHOLDER] * self.n_ctx)]).to(device)[0]
        end = start + self.n_ctx
        # The words fill exactly n_ctx slots when the end token follows them where it follows the placeholders.
        if int(ids[end]) != int(placeholders[end]) or bool((ids[:end] == placeholders[end]).any()):
            raise ValueError(
                f"ctx_init {ctx_init!r} does not tokenize to n_ctx={self.n_ctx} tokens; "
                f"pass n_ctx equal to its token count or another ctx_init"
            )
        words = ids[start:end]
        with torch.no_grad():
            return self._tower.token_embedding(words).float().cpu()

    def prompt_embeddings(self) -> torch.Tensor:
        """Token embeddings of every prompt with the context in place: [C, L, width]."""
        ctx = self.ctx.to(self.prefix.dtype).unsqueeze(0).expand(len(self.classnames), -1, -1)
        return torch.cat(
            [
                self.prefix,  # [C, start, width]: the start token
                ctx,  # [C, n_ctx, width]
                self.suffix,  # [C, L - start - n_ctx, width]: class name, full stop, end token
            ],
            dim=1,
        )

    def forward(self) -> torch.Tensor:
        """Run open_clip's ``encode_text`` steps on the prompt embeddings: returns [C, D]."""
        tower = self._tower
        length = self.token_ids.shape[1]
        cast_dtype = tower.transformer.get_cast_dtype()
        x = self.prompt_embeddings().to(cast_dtype)
        x = x + tower.positional_embedding[:length].to(cast_dtype)
        attn_mask = tower.attn_mask[:length, :length] if tower.attn_mask is not None else None
        x = tower.transformer(x, attn_mask=attn_mask)
        x = tower.ln_final(x)
        x = text_global_pool(x, self.token_ids, tower.pool_type, eos_token_id=tower.eos_id)
        if isinstance(tower.text_projection, torch.nn.Linear):
            x = tower.text_projection(x)
        elif tower.text_projection is not None:
            x = x @ tower.text_projection
        return x

    def class_embeddings(self) -> torch.Tensor:
        """L2-normalised class embeddings [C, D] in float32: the learned text classifier T."""
        return F.normalize(self().float(), dim=-1)


def _check_prompt_length(tokenizer, prompts: list[str], classnames: tuple[str, ...]) -> None:
    """Raise when a prompt does not fit the context length, since the tokenizer would cut the class name."""
    encode = getattr(tokenizer, "encode", None)
    context_length = getattr(tokenizer, "context_length", None)
    if encode is None or context_length is None:
        return
    for prompt, name in zip(prompts, classnames):
        needed = len(encode(prompt)) + 2  # start and end tokens
        if needed > context_length:
            raise ValueError(
                f"the prompt for class {name!r} needs {needed} tokens but the text encoder takes "
                f"{context_length}; shorten the class name or lower n_ctx"
            )


def _epoch_lr(training: PromptTraining, epoch: int) -> float:
    """Learning rate of an epoch: constant warm-up, then cosine from lr to 0 over the remaining epochs."""
    if epoch < training.warmup_epochs:
        return training.warmup_lr
    progress = (epoch - training.warmup_epochs) / max(1, training.epochs - training.warmup_epochs)
    return 0.5 * training.lr * (1.0 + math.cos(math.pi * progress))


def train_prompt_learner(
    learner: PromptLearner,
    features: torch.Tensor,
    labels: torch.Tensor,
    logit_scale: float,
    training: PromptTraining = PromptTraining(),
    generator: torch.Generator | None = None,
    progress: bool = True,
) -> list[float]:
    """Train the context with cross-entropy on s·f·Tᵀ, T from the learner; the encoder stays frozen.

    features [M, V, D] hold V cached views per training image ([M, D] counts as V = 1); each
    epoch visits every image once through one view drawn at random. labels [M] are true labels
    (CoOp) or pseudo-labels (UPL). Features move to the learner's device. The CPU generator
    fixes shuffling and views. Returns the mean loss of each epoch; a non-finite loss raises
    FloatingPointError.

    The learning rate follows the published schedule per epoch (Dassl steps its scheduler once
    per epoch): ``warmup_lr`` for ``warmup_epochs``, then cosine decay.
    """
    if features.ndim == 2:
        features = features.unsqueeze(1)
    num_images, num_views, _ = features.shape
    if num_images == 0:
        raise ValueError("no image to train the prompt learner on")
    if training.epochs < 1:
        raise ValueError(f"epochs must be an integer >= 1, got {training.epochs}")
    device = learner.ctx.device
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    features = features.to(device)
    labels = labels.to(device)
    optimizer = torch.optim.SGD(
        [learner.ctx], lr=training.lr, momentum=training.momentum, weight_decay=training.weight_decay
    )

    def set_epoch_lr(epoch):
        for group in optimizer.param_groups:
            group["lr"] = _epoch_lr(training, epoch)

    def logits_fn(batch_features, batch):
        return logit_scale * batch_features @ learner.class_embeddings().t()

    epoch_losses = fit_on_cached_views(
        features, labels, logits_fn, optimizer, training.epochs, training.batch_size, generator,
        on_epoch_start=set_epoch_lr, progress=progress, name="prompt learner",
        hint=f"lower the learning rate ({training.lr})",
    )
    return epoch_losses
