"""A toy vision-language world for hallucination studies on a CPU: synthetic scenes and a tiny Llava.

Scenes are ``grid x grid`` cells of ``cell x cell`` pixels; each object is a coloured shape filling one
cell, so one ViT patch (``patch_size = cell``) sees one object. Captions list the objects ("fork cup ."), or,
with ``SceneSpec(caption_phrase="there is a {}")``, one templated phrase per object, so that scenes of many
objects give long captions ("there is a fork there is a cup .").
Two ingredients make hallucination appear, as in real VLMs:

* co-occurrence bias: in training scenes, object ``B`` of each pair ``(A, B)`` appears with ``A`` with
  probability ``p_cooccur``; test scenes break the pair (``B`` present with probability ``p_cooccur_test``);
* weak visual evidence: the ``B`` objects are drawn at low contrast under pixel noise.

Training (:func:`train_toy_vlm`) drops the image of a fraction of examples (``image_dropout``), so the
image-free model ``p(y | x)`` that M3ID contrasts with is a real language prior, not an out-of-distribution
input. Everything is a real ``LlavaForConditionalGeneration`` with a word-level tokenizer and a
``LlavaProcessor``, so the same code paths serve real checkpoints.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .._validation import check_float, check_int, make_generator
from ..errors import ParameterError
from ._hf import require

__all__ = [
    "SceneSpec",
    "Scene",
    "sample_scenes",
    "render_scene",
    "caption",
    "pope_question",
    "caption_prompt",
    "build_processor",
    "build_toy_llava",
    "train_toy_vlm",
    "make_examples",
]

IMAGE_TOKEN = "<image>"
SPECIAL = ["<pad>", "<bos>", "<eos>", "<unk>", IMAGE_TOKEN]
PROMPT_WORDS = ["describe", "is", "there", "a", "?", ":", ".", "yes", "no"]

# 4x4 binary shapes (one per object, cycled): the visual identity of an object together with its colour.
_SHAPES = np.array(
    [
        [[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 1]],  # square
        [[0, 1, 1, 0], [1, 1, 1, 1], [1, 1, 1, 1], [0, 1, 1, 0]],  # disc
        [[1, 0, 0, 1], [0, 1, 1, 0], [0, 1, 1, 0], [1, 0, 0, 1]],  # cross
        [[1, 1, 1, 1], [1, 0, 0, 1], [1, 0, 0, 1], [1, 1, 1, 1]],  # ring
        [[0, 0, 0, 1], [0, 0, 1, 1], [0, 1, 1, 1], [1, 1, 1, 1]],  # triangle
        [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]],  # checker
    ],
    dtype=np.float32,
)


@dataclass(frozen=True)
class SceneSpec:
    """The toy world: objects, their co-occurrence pairs, which are hard to see, and the image geometry.

    ``pairs[i] = (A, B)``: in training scenes ``B`` joins ``A`` with probability ``p_cooccur``; ``B`` is
    drawn with contrast ``weak_contrast`` (others with 1) under Gaussian pixel noise ``noise`` (in [0, 1]
    intensity units). Images are ``grid * cell`` pixels square. A scene first draws ``min_objects`` to
    ``max_objects`` objects, then applies the pairs (which may add or remove a partner). The caption writes
    each object with ``caption_phrase`` (``"{}"``: the bare name), then a full stop; its words other than
    ``{}`` must be in the vocabulary. Training captions list the objects in ``objects`` order, or in a
    random order of each example with ``shuffle_captions``. With ``weak_last`` the low-contrast objects
    come after all the others (each group keeping its order): salient objects first, as real captions do,
    so the late, hard-to-see part of a caption is where the language prior has the most room. Yes/no
    questions are ``question_phrase`` with the object's name (``"is there a {}"`` puts the object last, so
    the answer is predicted right after it).
    """

    objects: tuple[str, ...] = ("cat", "dog", "bus", "car", "tree", "kite", "bird", "fork", "cup", "boat")
    pairs: tuple[tuple[str, str], ...] = (("fork", "cup"), ("bus", "car"), ("kite", "bird"))
    p_cooccur: float = 0.9
    p_cooccur_test: float = 0.5
    weak_contrast: float = 0.25
    noise: float = 0.15
    max_objects: int = 3
    grid: int = 4
    cell: int = 4
    min_objects: int = 1
    caption_phrase: str = "{}"
    shuffle_captions: bool = False
    weak_last: bool = False
    question_phrase: str = "is there a {} ?"

    def __post_init__(self) -> None:
        names = set(self.objects)
        for a, b in self.pairs:
            if a not in names or b not in names:
                raise ParameterError(f"pairs must use names from objects {self.objects}, got {(a, b)}")
        check_float("p_cooccur", self.p_cooccur, low=0.0, high=1.0)
        check_float("p_cooccur_test", self.p_cooccur_test, low=0.0, high=1.0)
        check_int("max_objects", self.max_objects, low=1, high=self.grid * self.grid)
        most = min(self.max_objects + len(self.pairs), len(self.objects))  # partners join after the draw
        if most > self.grid * self.grid:
            raise ParameterError(
                f"a scene may hold {most} objects (max_objects + one partner per pair), more than the "
                f"{self.grid * self.grid} cells of the grid"
            )
        check_int("min_objects", self.min_objects, low=1, high=self.max_objects)
        for name in ("caption_phrase", "question_phrase"):
            phrase = getattr(self, name)
            if phrase.count("{}") != 1:
                raise ParameterError(f"{name} must contain '{{}}' once, got {phrase!r}")
            unknown = [w for w in phrase.split() if w != "{}" and w not in PROMPT_WORDS]
            if unknown:
                raise ParameterError(f"{name} words {unknown} are not in the vocabulary {PROMPT_WORDS}")
        if self.cell != 4:
            raise ParameterError(f"cell must be 4 (the shape templates are 4x4), got {self.cell}")

    @property
    def image_size(self) -> int:
        return self.grid * self.cell

    @property
    def weak(self) -> frozenset[str]:
        return frozenset(b for _, b in self.pairs)

    def vocabulary(self) -> list[str]:
        return SPECIAL + PROMPT_WORDS + list(self.objects)


@dataclass(frozen=True)
class Scene:
    """Objects in a scene (in ``spec.objects`` order) and the cell index of each."""

    objects: tuple[str, ...]
    cells: tuple[int, ...]


def _colours(n: int) -> np.ndarray:
    # Evenly spaced hues on a fixed saturation/value: distinct colours without a colour library.
    hues = np.arange(n) / n
    rgb = np.stack([np.clip(np.abs((hues * 6 + k) % 6 - 3) - 1, 0, 1) for k in (0, 4, 2)], axis=1)
    return (0.25 + 0.75 * rgb).astype(np.float32)  # (n, 3)


def sample_scenes(
    spec: SceneSpec, n: int, *, test: bool = False, seed: int | torch.Generator | None = 0
) -> list[Scene]:
    """Draw ``n`` scenes: min_objects..max_objects objects uniformly, then each pair's co-occurrence rule.

    ``test=True`` uses ``p_cooccur_test`` (the pair's bias broken) instead of ``p_cooccur``.
    """
    n = check_int("n", n, low=0)
    gen = make_generator(seed)
    p = spec.p_cooccur_test if test else spec.p_cooccur
    scenes = []
    for _ in range(n):
        k = int(torch.randint(spec.min_objects, spec.max_objects + 1, (1,), generator=gen))
        chosen = {spec.objects[i] for i in torch.randperm(len(spec.objects), generator=gen)[:k].tolist()}
        for a, b in spec.pairs:
            if a in chosen:
                if torch.rand((), generator=gen) < p:
                    chosen.add(b)
                else:
                    chosen.discard(b)
        objs = tuple(o for o in spec.objects if o in chosen)
        cells = torch.randperm(spec.grid * spec.grid, generator=gen)[: len(objs)].tolist()
        scenes.append(Scene(objs, tuple(cells)))
    return scenes


def render_scene(spec: SceneSpec, scene: Scene, *, seed: int | torch.Generator | None = 0) -> np.ndarray:
    """Render a scene as a uint8 RGB image (image_size, image_size, 3); ``B`` objects at low contrast."""
    gen = make_generator(seed)
    colours = _colours(len(spec.objects))
    img = np.full((spec.image_size, spec.image_size, 3), 0.5, dtype=np.float32)
    for name, cell in zip(scene.objects, scene.cells, strict=True):
        i = spec.objects.index(name)
        r, c = divmod(cell, spec.grid)
        shape = _SHAPES[i % len(_SHAPES)][:, :, None]  # (4, 4, 1)
        contrast = spec.weak_contrast if name in spec.weak else 1.0
        patch = img[r * spec.cell : (r + 1) * spec.cell, c * spec.cell : (c + 1) * spec.cell]
        patch[:] = patch + contrast * shape * (colours[i] - 0.5)
    noise = torch.randn(img.shape, generator=gen).numpy() * spec.noise
    return (np.clip(img + noise, 0, 1) * 255).round().astype(np.uint8)


def caption(scene: Scene, spec: SceneSpec | None = None, order: Sequence[int] | None = None) -> str:
    """Reference caption: the objects (in canonical order, or ``scene.objects[i] for i in order``), each
    written as ``spec.caption_phrase``, then a full stop.

    >>> caption(Scene(("fork", "cup"), (0, 1)))
    'fork cup .'
    >>> caption(Scene(("fork", "cup"), (0, 1)), SceneSpec(caption_phrase="there is a {}"), order=[1, 0])
    'there is a cup there is a fork .'
    """
    phrase = "{}" if spec is None else spec.caption_phrase
    objects = scene.objects if order is None else [scene.objects[i] for i in order]
    if sorted(objects) != sorted(scene.objects):
        raise ParameterError(f"order must be a permutation of range({len(scene.objects)}), got {order}")
    return " ".join([phrase.format(o) for o in objects] + ["."])


def caption_prompt(with_image: bool = True) -> str:
    return f"{IMAGE_TOKEN} describe :" if with_image else "describe :"


def pope_question(obj: str, with_image: bool = True, spec: SceneSpec | None = None) -> str:
    """The yes/no question about ``obj`` (``spec.question_phrase``; without ``spec``: ``is there a X ?``).

    >>> pope_question("cup")
    '<image> is there a cup ?'
    >>> pope_question("cup", with_image=False, spec=SceneSpec(question_phrase="is there a {}"))
    'is there a cup'
    """
    q = (SceneSpec.question_phrase if spec is None else spec.question_phrase).format(obj)
    return f"{IMAGE_TOKEN} {q}" if with_image else q


def build_processor(spec: SceneSpec) -> Any:
    """A ``LlavaProcessor``: a word-level tokenizer over ``spec.vocabulary()`` and a PIL image processor."""
    require("transformers", "hf")
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import LlavaProcessor, PreTrainedTokenizerFast

    try:  # the PIL backend: the default backend needs torchvision, which this project keeps out of .venv
        from transformers import CLIPImageProcessorPil as ImageProcessor
    except ImportError:  # pragma: no cover - older transformers
        from transformers import CLIPImageProcessor as ImageProcessor

    vocab = spec.vocabulary()
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    bos = vocab.index("<bos>")
    core.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", bos)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        extra_special_tokens={"image_token": IMAGE_TOKEN},
    )
    image_processor = ImageProcessor(
        do_resize=False, do_center_crop=False, do_convert_rgb=True, image_mean=[0.5] * 3, image_std=[0.5] * 3
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=spec.cell,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's class token, dropped by the "default" strategy
    )


def build_toy_llava(
    spec: SceneSpec, *, hidden: int = 64, layers: int = 2, vision_hidden: int = 32, seed: int = 0
) -> Any:
    """A randomly initialised ``LlavaForConditionalGeneration`` sized for the toy world (about 0.1 M weights).

    Text: Llama with ``hidden`` width and ``layers`` layers; vision: CLIP with patch = cell, so
    ``grid**2`` image tokens.
    """
    require("transformers", "hf")
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vocab = spec.vocabulary()
    text = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=128,
        pad_token_id=vocab.index("<pad>"),
        bos_token_id=vocab.index("<bos>"),
        eos_token_id=vocab.index("<eos>"),
    )
    vision = CLIPVisionConfig(
        hidden_size=vision_hidden,
        intermediate_size=2 * vision_hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        image_size=spec.image_size,
        patch_size=spec.cell,
    )
    config = LlavaConfig(
        text_config=text,
        vision_config=vision,
        image_token_index=vocab.index(IMAGE_TOKEN),
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = text.pad_token_id
    model.generation_config.bos_token_id = text.bos_token_id
    model.generation_config.eos_token_id = text.eos_token_id
    return model.eval()


Target = str | tuple[tuple[str, bool], ...]  # text, or (text, scored) segments


def make_examples(
    spec: SceneSpec,
    scenes: Sequence[Scene],
    *,
    pope_fraction: float = 0.5,
    questions: int = 1,
    seed: int | torch.Generator | None = 0,
) -> list[tuple[int, str, Target]]:
    """Training examples ``(scene index, prompt, target)``: captions, and yes/no questions for a fraction.

    Questions ask about a present object or an absent one with equal probability (a present one when the
    scene holds every object, and an absent one when it holds none). With ``questions > 1`` a yes/no
    example asks that many questions about its scene in a row, and its target is a tuple of ``(text,
    scored)`` segments: the answers (and the closing full stop) are scored, the follow-up questions are
    not (:func:`train_toy_vlm` masks them). With ``spec.shuffle_captions`` each caption lists its objects
    in a random order.
    """
    questions = check_int("questions", questions, low=1)
    gen = make_generator(seed)

    def ask(scene: Scene) -> tuple[str, bool]:
        absent = [o for o in spec.objects if o not in scene.objects]
        present = torch.rand((), generator=gen) < 0.5 and len(scene.objects) > 0
        # A scene that holds every object has none to ask about as absent: ask about a present
        # one (the draw above is kept, so every other scene's questions stay the same).
        present = bool(present) or not absent
        pool = list(scene.objects) if present else absent
        return pool[int(torch.randint(len(pool), (1,), generator=gen))], present

    out: list[tuple[int, str, Target]] = []
    for i, scene in enumerate(scenes):
        if torch.rand((), generator=gen) < pope_fraction:
            obj, present = ask(scene)
            answer = "yes" if present else "no"
            if questions == 1:
                out.append((i, pope_question(obj, spec=spec), f"{answer} ."))
                continue
            segments = [(answer, True)]
            for _ in range(questions - 1):
                obj_k, present_k = ask(scene)
                segments += [(pope_question(obj_k, with_image=False, spec=spec), False),
                             ("yes" if present_k else "no", True)]
            out.append((i, pope_question(obj, spec=spec), (*segments, (".", True))))
        else:
            order = None
            if spec.shuffle_captions:
                order = torch.randperm(len(scene.objects), generator=gen).tolist()
            if spec.weak_last:  # stable sort: salient objects first, each group keeps its order
                order = sorted(range(len(scene.objects)) if order is None else order,
                               key=lambda j: scene.objects[j] in spec.weak)
            out.append((i, caption_prompt(), caption(scene, spec, order)))
    return out


def train_toy_vlm(
    model: Any,
    processor: Any,
    images: Sequence[np.ndarray],
    examples: Sequence[tuple[int, str, Target]],
    *,
    steps: int = 400,
    batch_size: int = 64,
    lr: float = 3e-3,
    image_dropout: float = 0.2,
    seed: int = 0,
    progress: bool = False,
) -> list[float]:
    """Train ``model`` in place on ``examples`` (``(image index, prompt, target)``); return the loss curve.

    The loss is next-token cross-entropy on the target tokens and the end-of-sequence token only (for a
    target of ``(text, scored)`` segments, on the scored segments' tokens and the end token). A random
    ``image_dropout`` fraction of each batch loses its image (the image tokens are removed from the prompt),
    so the model also learns the image-free distribution ``p(y | x)``. Training runs on the model's device
    (move the model first, e.g. ``model.to("cuda")``); the batches are drawn on the CPU from ``seed``.
    """
    steps = check_int("steps", steps, low=0)
    batch_size = check_int("batch_size", batch_size, low=1)
    image_dropout = check_float("image_dropout", image_dropout, low=0.0, high=1.0)
    from tqdm.auto import tqdm

    tok = processor.tokenizer
    gen = make_generator(seed)
    # Pixel values once for all images: (n_images, 3, H, W).
    pixels = processor.image_processor([img for img in images], return_tensors="pt")["pixel_values"]
    n_img_tokens = (images[0].shape[0] // model.config.vision_config.patch_size) ** 2
    image_id, pad_id, bos_id, eos_id = (
        tok.convert_tokens_to_ids(IMAGE_TOKEN),
        tok.pad_token_id,
        tok.bos_token_id,
        tok.eos_token_id,
    )
    def encode(target: Target) -> tuple[list[int], list[int]]:
        """Token ids of a target and their labels (-100 where a segment is not scored)."""
        segments = ((target, True),) if isinstance(target, str) else target
        ids: list[int] = []
        labels: list[int] = []
        for text, scored in segments:
            seg = tok(text, add_special_tokens=False)["input_ids"]
            ids += seg
            labels += seg if scored else [-100] * len(seg)
        return ids, labels

    encoded = [(i, tok(p, add_special_tokens=False)["input_ids"], *encode(t)) for i, p, t in examples]
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 20) * 0.5 * (1 + math.cos(math.pi * s / max(steps, 1)))
    )
    model.train()
    losses = []
    for _ in tqdm(range(steps), desc="train toy VLM", disable=not progress, leave=False):
        idx = torch.randint(len(encoded), (batch_size,), generator=gen).tolist()
        drop = (torch.rand(batch_size, generator=gen) < image_dropout).tolist()
        rows, labels, img_rows = [], [], []
        for j, d in zip(idx, drop, strict=True):
            i, prompt_ids, target_ids, target_labels = encoded[j]
            # The processor expands one <image> into the image tokens; do the same (or drop them).
            p = [x for x in prompt_ids if x != image_id] if d else _expand(prompt_ids, image_id, n_img_tokens)
            if not d and image_id in prompt_ids:
                img_rows.append(i)
            seq = [bos_id] + p + target_ids + [eos_id]
            rows.append(seq)
            labels.append([-100] * (1 + len(p)) + target_labels + [eos_id])
        length = max(len(r) for r in rows)
        ids = torch.full((batch_size, length), pad_id)
        lab = torch.full((batch_size, length), -100)
        mask = torch.zeros((batch_size, length), dtype=torch.long)
        for k, (r, y) in enumerate(zip(rows, labels, strict=True)):  # right padding for training
            ids[k, : len(r)] = torch.tensor(r)
            lab[k, : len(y)] = torch.tensor(y)
            mask[k, : len(r)] = 1
        dev = model.device
        kwargs = {"pixel_values": pixels[img_rows].to(dev)} if img_rows else {}
        out = model(input_ids=ids.to(dev), attention_mask=mask.to(dev), labels=lab.to(dev), **kwargs)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(out.loss.item())
    model.eval()
    return losses


def _expand(ids: list[int], image_id: int, n: int) -> list[int]:
    out: list[int] = []
    for x in ids:
        out.extend([image_id] * n if x == image_id else [x])
    return out
