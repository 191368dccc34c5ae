"""Artist and perception at real architecture sizes on one GPU, with random weights.

    python bench/gpu_image_models.py --out DIR

FLUX.1-schnell shape (12B transformer, T5-XXL, CLIP-L, VAE) at 1024x1024, 4 steps: seconds per image and
peak memory. LLaVA-NeXT-Mistral-7B shape: latency for one image plus 64 output tokens, and peak memory.
Tokenizers are the tiny ones from shared.models.tiny (random weights make the vocabulary irrelevant); the
pipeline and the model are the real classes at the real sizes, in bfloat16.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from shared.config.units import GB  # noqa: E402


def _component(arch: str, name: str):
    from shared.planning.architectures import build_config, get_architecture

    spec = get_architecture(arch)
    return build_config(next(c for c in spec.components if c.name == name))


def flux(runs: int) -> dict:
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5EncoderModel

    from shared.models.tiny.flux import build_clip_tokenizer, build_t5_tokenizer

    torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    torch.set_default_dtype(torch.bfloat16)  # build straight in bf16: a float32 12B transformer alone is 48 GB
    with torch.device("cuda"):
        transformer = FluxTransformer2DModel.from_config(_component("flux.1-schnell", "transformer"))
        vae = AutoencoderKL.from_config(_component("flux.1-schnell", "vae"))
        clip = CLIPTextModel(_component("flux.1-schnell", "text_encoder"))
        t5 = T5EncoderModel(_component("flux.1-schnell", "text_encoder_2"))
    torch.set_default_dtype(torch.float32)
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=clip,
                        tokenizer=build_clip_tokenizer(Path(tempfile.mkdtemp())), text_encoder_2=t5,
                        tokenizer_2=build_t5_tokenizer(), transformer=transformer)
    build_s = time.perf_counter() - started
    weights = torch.cuda.memory_allocated()
    times = []
    for i in range(runs):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        image = pipe("a red lighthouse at sunset", height=1024, width=1024, num_inference_steps=4, guidance_scale=0.0,
                     max_sequence_length=256, generator=torch.Generator("cpu").manual_seed(i)).images[0]
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    result = {"build_seconds": round(build_s, 1), "weights_gb": round(weights / GB, 2),
              "seconds_per_image": [round(t, 3) for t in times],
              "peak_gb": round(torch.cuda.max_memory_allocated() / GB, 2),
              "png_bytes": len(buf.getvalue()), "size": image.size,
              "parameters_b": round(sum(p.numel() for m in (transformer, vae, clip, t5)
                                        for p in m.parameters()) / 1e9, 2)}
    del pipe, transformer, vae, clip, t5
    torch.cuda.empty_cache()
    return result


def llava(runs: int) -> dict:
    import torch
    from PIL import Image
    from transformers import LlavaNextForConditionalGeneration, LlavaNextImageProcessor, LlavaNextProcessor

    from shared.models.tiny.llava import CHAT_TEMPLATE, build_tokenizer

    tokenizer = build_tokenizer()
    config = _component("llava-v1.6-mistral-7b", "model")
    config.image_token_index = tokenizer.convert_tokens_to_ids("<image>")
    torch.cuda.reset_peak_memory_stats()
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = LlavaNextForConditionalGeneration(config).eval()
    torch.set_default_dtype(torch.float32)
    weights = torch.cuda.memory_allocated()
    side = config.vision_config.image_size  # 336 for CLIP ViT-L/14-336
    image_processor = LlavaNextImageProcessor(image_grid_pinpoints=config.image_grid_pinpoints,
                                              size={"shortest_edge": side}, crop_size={"height": side, "width": side})
    processor = LlavaNextProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=14,
                                   vision_feature_select_strategy=config.vision_feature_select_strategy,
                                   num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE)
    picture = Image.new("RGB", (672, 672), (200, 30, 30))
    prompt = processor.apply_chat_template([{"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": "What is shown in this image?"}]}], add_generation_prompt=True)
    inputs = processor(images=picture, text=prompt, return_tensors="pt").to("cuda")
    inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
    times = []
    for _ in range(runs):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = model.generate(**inputs, max_new_tokens=64, min_new_tokens=64, do_sample=False)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    result = {"weights_gb": round(weights / GB, 2), "prompt_tokens": int(inputs["input_ids"].shape[1]),
              "new_tokens": int(out.shape[1] - inputs["input_ids"].shape[1]),
              "seconds_one_image_64_tokens": [round(t, 3) for t in times],
              "peak_gb": round(torch.cuda.max_memory_allocated() / GB, 2),
              "parameters_b": round(sum(p.numel() for p in model.parameters()) / 1e9, 2)}
    del model
    torch.cuda.empty_cache()
    return result


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--only", default="flux,llava")
    args = parser.parse_args()
    import torch

    report = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    jobs = (("flux_schnell_1024", flux), ("llava_next_mistral_7b", llava))
    for name, fn in [j for j in jobs if j[0].split("_")[0] in args.only]:
        try:
            report[name] = fn(args.runs)
        except Exception as exc:  # report what failed and keep the other measurement
            report[name] = {"error": f"{type(exc).__name__}: {exc}"}
        print(name, json.dumps(report[name]), flush=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "gpu_image_models.json").write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
