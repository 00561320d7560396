"""M3ID: decode against visual hallucination, compared with greedy decoding on a toy vision-language model.

A tiny Llava-architecture model is built from a config (no download) and trained for a few steps to caption
synthetic scenes whose objects co-occur in training; captions are decoded greedily and with M3ID, and
scored with CHAIR (hallucinated objects); VCD (contrast with a noised image) is decoded for comparison.
M3ID adds ``w_t (log p(y|image) - log p(y))`` to the logits when
the model is unsure, with ``w_t = exp(lambda t) - 1`` growing along the caption. Run:
``python examples/m3id.py`` (``--tiny`` for the test size; the real study is ``layerwise reproduce m3id``).
Needs the ``hf`` extra. Guide: docs/guides/m3id.md.
"""

from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> dict:
    """Run the example; returns the captions and CHAIR metrics of both decoders."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tiny", action="store_true", help="smallest sizes (what the tests run)")
    parser.add_argument("--lambda", dest="lambda_", type=float, default=0.02,
                        help="M3ID's lambda (0.02 in the paper; 0 turns the correction off: greedy)")
    args = parser.parse_args(argv)
    from PIL import Image

    from layerwise.decoding import chair, m3id_generate, vcd_generate
    from layerwise.decoding.toy_vlm import (
        SceneSpec,
        build_processor,
        build_toy_llava,
        caption_prompt,
        make_examples,
        render_scene,
        sample_scenes,
        train_toy_vlm,
    )

    steps, n_train, n_test, batch = (8, 32, 4, 16) if args.tiny else (400, 2000, 32, 64)
    spec = SceneSpec()
    proc, model = build_processor(spec), build_toy_llava(spec, seed=0)
    train = sample_scenes(spec, n_train, seed=1)
    images = [render_scene(spec, s, seed=i) for i, s in enumerate(train)]
    examples = make_examples(spec, train, seed=2)                      # (image index, prompt, target)
    train_toy_vlm(model, proc, images, examples, steps=steps, batch_size=batch, seed=3)

    test = sample_scenes(spec, n_test, test=True, seed=4)
    test_images = [Image.fromarray(render_scene(spec, s, seed=10_000 + i)) for i, s in enumerate(test)]
    prompts = [caption_prompt()] * n_test
    inputs = proc(images=test_images, text=prompts, padding=True, padding_side="left", return_tensors="pt")
    out = model.generate(**inputs, do_sample=False, max_new_tokens=12)
    greedy = proc.tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    m3id = m3id_generate(model, proc, test_images, prompts, lambda_=args.lambda_, alpha=0.3,
                         max_new_tokens=12, do_sample=False, path="batched")
    vcd = vcd_generate(model, proc, test_images, prompts, alpha=1.0, beta=0.1, noise_step=500,
                       max_new_tokens=12, do_sample=False)

    truth = [s.objects for s in test]
    synonyms = {o: [o + "s"] for o in spec.objects}
    scores = {"greedy": chair(greedy, truth, synonyms), "m3id": chair(m3id, truth, synonyms),
              "vcd": chair(vcd, truth, synonyms)}
    for i in range(min(n_test, 4)):
        print(f"objects {sorted(truth[i])}\n  greedy: {greedy[i]}\n  M3ID:   {m3id[i]}\n  VCD:    {vcd[i]}")
    for name, metrics in scores.items():
        print(f"{name:>6}: CHAIR_i = {metrics['chair_i']:.3f}, CHAIR_s = {metrics['chair_s']:.3f}")
    return {"greedy": greedy, "m3id": m3id, "vcd": vcd, "chair": scores, "truth": truth}


if __name__ == "__main__":
    main()
