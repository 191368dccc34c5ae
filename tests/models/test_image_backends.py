"""The image backends on tiny real-architecture checkpoints: FLUX draws PNGs, LLaVA-NeXT looks at pictures."""

from __future__ import annotations

import gc
import io
import logging
import threading
import weakref
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from shared.config.schema import GenerationDefaults, ImageDefaults, ModelEntry
from shared.engine.cancel import Cancelled
from shared.models import hf_vision
from shared.models.base import BackendError, LoadedModel, SpecialistOutput, load_model
from shared.models.diffusers_image import checked_settings
from shared.models.tiny import flux as tiny_flux
from shared.models.tiny import llava as tiny_llava
from shared.runtime.process import guard_user_text
from shared.wire.messages import ChatTurn, GenerationOptions
from tests.models.tiny import cpu_context

pytestmark = pytest.mark.models

DRAW = [ChatTurn(role="system", content="watercolor style"), ChatTurn(role="user", content="a red lighthouse")]
LOOK = [ChatTurn(role="user", content="What is shown in this image?")]


def run(model: LoadedModel, messages: list[ChatTurn], image: bytes | None = None,
        options: GenerationOptions | None = None, cancel: threading.Event | None = None,
        ) -> tuple[list[str], SpecialistOutput]:
    """Drain run_specialist: (text pieces, final output)."""
    items = list(model.run_specialist(messages, image, options or GenerationOptions(), cancel or threading.Event()))
    assert isinstance(items[-1], SpecialistOutput)
    assert all(isinstance(item, str) for item in items[:-1])
    return items[:-1], items[-1]


def png(width: int, height: int, colour: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buffer, format="PNG")
    return buffer.getvalue()


# ---------------------------------------------------------------- FLUX


@pytest.fixture(scope="session")
def flux_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_flux.build_checkpoint(tmp_path_factory.mktemp("tiny-flux"))


@pytest.fixture(scope="session")
def flux(flux_dir: Path) -> Iterator[LoadedModel]:
    entry = ModelEntry(name="artist", kind="image_generation", backend="diffusers", path=str(flux_dir))
    model = load_model(entry, cpu_context())
    yield model
    model.unload()


@pytest.mark.parametrize(("width", "height"), [(32, 32), (64, 48)])
def test_flux_draws_a_png_of_the_requested_size(flux: LoadedModel, width: int, height: int) -> None:
    pieces, output = run(flux, DRAW, options=GenerationOptions(width=width, height=height, steps=2, seed=7))
    assert output.image is not None and output.image.mime == "image/png"
    picture = Image.open(io.BytesIO(output.image.data))
    assert picture.format == "PNG" and picture.size == (width, height)
    assert (output.image.width, output.image.height) == (width, height)
    assert output.text == "".join(pieces)
    assert output.text.startswith("I drew: a red lighthouse. watercolor style")
    assert f"({width}x{height}, 2 steps, seed 7)" in output.text


def test_flux_never_writes_the_prompt_to_the_log(flux: LoadedModel) -> None:
    """diffusers quotes the part of a long prompt that CLIP and T5 cut; the guard every service installs drops it."""
    factory, lines = logging.getLogRecordFactory(), []
    listener = logging.Handler()
    listener.emit = lambda record: lines.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger("diffusers").addHandler(listener)
    guard_user_text(debug_content=False)
    try:
        run(flux, [ChatTurn(role="user", content="a red lighthouse " + "my secret diary " * 300)],
            options=GenerationOptions(width=32, height=32, steps=1, seed=1))
    finally:
        logging.setLogRecordFactory(factory)
        logging.getLogger("diffusers").removeHandler(listener)
    quoted = [line for line in lines if "was truncated" in line]
    assert quoted and all("characters of user text omitted" in line for line in quoted)
    assert not any("secret" in line for line in lines)


def test_flux_rounds_sizes_down_and_refuses_too_large(flux: LoadedModel) -> None:
    _, output = run(flux, DRAW, options=GenerationOptions(width=40, height=20, steps=1, seed=1))
    assert (output.image.width, output.image.height) == (32, 16)
    with pytest.raises(BackendError, match="at most 2048"):
        run(flux, DRAW, options=GenerationOptions(width=4096, height=32, steps=1))
    with pytest.raises(BackendError, match="1 to 50"):
        run(flux, DRAW, options=GenerationOptions(width=32, height=32, steps=51))
    with pytest.raises(BackendError, match="seed"):
        run(flux, DRAW, options=GenerationOptions.model_construct(width=32, height=32, steps=1, seed=-1))


def test_flux_same_seed_same_bytes(flux: LoadedModel) -> None:
    options = GenerationOptions(width=32, height=32, steps=2, seed=123)
    first, second = run(flux, DRAW, options=options)[1], run(flux, DRAW, options=options)[1]
    other = run(flux, DRAW, options=options.model_copy(update={"seed": 124}))[1]
    assert first.image.data == second.image.data
    assert other.image.data != first.image.data


def test_flux_without_a_seed_reports_the_one_it_drew(flux: LoadedModel) -> None:
    _, output = run(flux, DRAW, options=GenerationOptions(width=32, height=32, steps=1))
    seed = int(output.text.rsplit("seed ", 1)[1].rstrip(")"))
    again = run(flux, DRAW, options=GenerationOptions(width=32, height=32, steps=1, seed=seed))[1]
    assert again.image.data == output.image.data


def test_flux_cancel_raises_cancelled(flux: LoadedModel) -> None:
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(Cancelled):
        run(flux, DRAW, options=GenerationOptions(width=32, height=32, steps=2), cancel=cancel)


def test_flux_cancel_mid_run_stops_between_steps(flux: LoadedModel, monkeypatch: pytest.MonkeyPatch) -> None:
    cancel = threading.Event()
    scheduler = flux.pipe.scheduler
    original = type(scheduler).step

    def step_then_cancel(self: object, *args: object, **kwargs: object) -> object:
        cancel.set()
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(scheduler), "step", step_then_cancel)
    with pytest.raises(Cancelled, match="step 1"):
        run(flux, DRAW, options=GenerationOptions(width=32, height=32, steps=4), cancel=cancel)


def test_flux_needs_a_subject(flux: LoadedModel) -> None:
    with pytest.raises(BackendError, match="what to draw"):
        run(flux, [ChatTurn(role="system", content="watercolor")])


def test_flux_unload_frees_the_pipeline(flux_dir: Path) -> None:
    entry = ModelEntry(name="artist", kind="image_generation", backend="diffusers", path=str(flux_dir))
    model = load_model(entry, cpu_context())
    assert model.placement()["transformer"] == "cpu"
    assert model.memory()[0].device == "cpu"
    transformer = weakref.ref(model.pipe.transformer)
    model.unload()
    gc.collect()
    assert transformer() is None
    with pytest.raises(BackendError, match="unloaded"):
        run(model, DRAW)


def test_flux_bad_path_is_a_backend_error(tmp_path: Path) -> None:
    entry = ModelEntry(name="artist", kind="image_generation", backend="diffusers", path=str(tmp_path / "none"))
    with pytest.raises(BackendError, match="could not load"):
        load_model(entry, cpu_context())


def test_flux_refuses_what_it_cannot_honour(flux_dir: Path) -> None:
    for wrong in ({"device_map": "auto"}, {"kind": "causal_lm"}):
        fields = {"name": "artist", "kind": "image_generation", "backend": "diffusers", "path": str(flux_dir)}
        entry = ModelEntry(**{**fields, **wrong})
        with pytest.raises(BackendError, match="artist"):
            load_model(entry, cpu_context())
    quantized = ModelEntry(name="artist", kind="image_generation", backend="diffusers", path=str(flux_dir),
                           quantization="bnb-nf4")
    with pytest.raises(BackendError, match="needs a CUDA GPU"):
        load_model(quantized, cpu_context())
    with pytest.raises(ValueError, match="an image model quantizes through bitsandbytes"):  # Lyra's: text models
        ModelEntry(name="artist", kind="image_generation", backend="diffusers", path=str(flux_dir), quantization="int8")


def test_image_settings_come_from_the_entry_table() -> None:
    entry = ModelEntry(name="artist", kind="image_generation", backend="diffusers", path="x",
                       image={"steps": 2, "cpu_offload": True})
    assert checked_settings(entry) == ImageDefaults(steps=2, cpu_offload=True)
    with pytest.raises(ValueError, match="stpes"):
        ModelEntry(name="artist", kind="image_generation", backend="diffusers", path="x", image={"stpes": 2})
    with pytest.raises(ValueError, match="max_side"):
        ImageDefaults(width=4096)


# ---------------------------------------------------------------- LLaVA-NeXT


@pytest.fixture(scope="session")
def llava_entry(tmp_path_factory: pytest.TempPathFactory) -> ModelEntry:
    folder = tiny_llava.build_checkpoint(tmp_path_factory.mktemp("tiny-llava"))
    return ModelEntry(name="perception", kind="vision_language", backend="transformers", path=str(folder),
                      max_context=512, system_prompt="Describe pictures briefly.",
                      generation=GenerationDefaults(max_new_tokens=8, temperature=0.0))


@pytest.fixture(scope="session")
def llava(llava_entry: ModelEntry) -> Iterator[LoadedModel]:
    # TODO: load_model once hf_causal.load dispatches vision_language entries to hf_vision
    model = hf_vision.load(llava_entry, cpu_context())
    yield model
    model.unload()


def test_llava_answers_about_an_image_deterministically(llava: LoadedModel) -> None:
    messages = [ChatTurn(role="system", content="Describe pictures briefly."), *LOOK]
    pieces, output = run(llava, messages, image=png(40, 30))
    assert output.text and output.text == "".join(pieces)
    assert run(llava, messages, image=png(40, 30))[1].text == output.text


def test_llava_uses_the_image(llava: LoadedModel) -> None:
    prompt = llava._prompt(LOOK, with_image=True)
    assert prompt.count(llava.processor.image_token) == 1
    inputs = llava._inputs(LOOK, hf_vision.decode_image(png(40, 30)))
    assert "pixel_values" in inputs and (inputs["input_ids"] == llava.model.config.image_token_index).sum() > 1


def test_llava_answers_without_an_image(llava: LoadedModel) -> None:
    # an "<image>" typed by the user is text, not a placeholder the processor would try to fill
    pieces, output = run(llava, [ChatTurn(role="user", content="Describe a cat <image> please")])
    assert output.text and output.text == "".join(pieces)


def test_llava_refuses_garbage_image_bytes(llava: LoadedModel) -> None:
    with pytest.raises(BackendError, match="could not be read"):
        run(llava, LOOK, image=b"\x89PNG\r\n\x1a\n definitely not a picture")


def test_llava_cancel_raises_cancelled(llava: LoadedModel) -> None:
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(Cancelled):
        run(llava, LOOK, image=png(16, 16), cancel=cancel)


def test_llava_cancel_mid_stream_raises_cancelled(llava: LoadedModel) -> None:
    cancel = threading.Event()
    stream = llava.run_specialist(LOOK, png(16, 16), GenerationOptions(), cancel)
    assert isinstance(next(stream), str)
    cancel.set()
    with pytest.raises(Cancelled):
        list(stream)


def test_llava_unload_frees_the_model(llava_entry: ModelEntry) -> None:
    model = hf_vision.load(llava_entry, cpu_context())
    assert model.placement() == {"model": "cpu", "engine": "dynamic (CPU)"}
    weights = weakref.ref(model.model)
    model.unload()
    gc.collect()
    assert weights() is None


def test_the_plan_of_an_offloaded_pipeline_folder_holds_its_largest_component(flux_dir: Path) -> None:
    from shared.planning.estimate import estimate_model
    from shared.planning.inventory import inventory_for

    def artist(offload: bool) -> ModelEntry:
        return ModelEntry(name="artist", kind="image_generation", backend="diffusers", path=str(flux_dir),
                          dtype="float32", image={"cpu_offload": offload})

    parts = inventory_for(artist(True)).components
    assert {name for name, *_ in parts} >= {"transformer", "text_encoder", "text_encoder_2", "vae"}
    largest = max(linear + other for _, linear, _, other in parts)
    assert estimate_model(artist(True)).weights == largest * 4  # float32: 4 bytes an element
    assert estimate_model(artist(False)).weights > estimate_model(artist(True)).weights


@pytest.mark.parametrize(("subject", "expected"), [
    ("A lighthouse at sunset.", "A lighthouse at sunset. In watercolor."),
    ("A lighthouse at sunset", "A lighthouse at sunset. In watercolor."),
    ("Can you draw a fox?", "Can you draw a fox? In watercolor."),
])
def test_the_image_prompt_joins_subject_and_style_with_one_stop(subject: str, expected: str) -> None:
    from shared.models.diffusers_image import compose_prompt

    turns = [ChatTurn(role="system", content="In watercolor."), ChatTurn(role="user", content=subject)]
    assert compose_prompt(turns) == expected
    assert compose_prompt([ChatTurn(role="user", content=subject)]) == subject
