"""A web page to generate images with SDXL and learned words.

    streamlit run demo/sampling.py
    streamlit run demo/sampling.py -- --config configs/inference/sd_xl_tiny.yaml

The flags after `--` only set the page's starting values; everything can be changed on the page. The model
is loaded once per (config, weights) and kept across reruns; errors show on the page, which keeps working.
"""
import argparse
import os
import sys
import warnings

import streamlit as st
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from gm.device import DEVICE_TARGETS, PRECISIONS, resolve_device, set_device  # noqa: E402
from gm.models.loading import load_config  # noqa: E402
from gm.modules.diffusionmodules.sampler_names import SAMPLERS  # noqa: E402
from gm.sampling import SDXLPipeline, SamplingError, build_engine, png_bytes, sampling_defaults  # noqa: E402
from gm.textual_inversion.embedding_io import DIFFUSERS_FILES, EmbeddingFormatError, load_embedding  # noqa: E402
from gm.weights.loader import WeightFileError  # noqa: E402
from gm.weights.state_dict import WeightMismatchError  # noqa: E402

USER_ERRORS = (SamplingError, EmbeddingFormatError, WeightFileError, WeightMismatchError, OSError)
READABLE_WIDTH = 256  # pixels: smaller images are shown enlarged (a 64 px image is too small to judge)


def page_defaults(argv):
    """Starting values from the flags after `--` (unknown flags are ignored: the page may run under a test)."""
    parser = argparse.ArgumentParser(allow_abbrev=False)
    parser.add_argument("--config", default=os.path.join(ROOT, "configs/inference/sd_xl_base.yaml"))
    parser.add_argument("--weight", default="")
    parser.add_argument("--embeddings_dir", default="runs", help="a folder of training runs")
    parser.add_argument("--device_target", choices=DEVICE_TARGETS, default="auto",
                        help="auto: Ascend when its toolkit is installed, else CPU")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto", help="auto: fp16 on Ascend, fp32 elsewhere")
    parser.add_argument("--sample_step", type=int, default=40)
    parser.add_argument("--H", type=int, help="default: the config's sampling.resolution, else 1024")
    parser.add_argument("--W", type=int, help="default: the config's sampling.resolution, else 1024")
    return parser.parse_known_args(argv)[0]


@st.cache_resource
def start_device(device_target, precision):
    """MindSpore's device and mode, set once per page process: (device target, precision) with "auto" resolved."""
    target, precision = resolve_device(device_target, precision)
    set_device(target)
    return target, precision


@st.cache_resource(max_entries=1, show_spinner="Loading the model (once; later runs reuse it) ...")
def load_pipeline(config, weight, precision):
    """One model at a time: a new config or weights replace the cached model (SDXL takes 14 GB in fp32)."""
    return SDXLPipeline(build_engine(config, weight or None, precision))


def find_embeddings(folder):
    """Embedding files under `folder` (training runs write .ckpt and .safetensors), relative and sorted;
    of a diffusers pair only its first file."""
    found = []
    for parent, _, names in os.walk(folder):
        for name in names:
            if name.endswith((".ckpt", ".safetensors")) and name != DIFFUSERS_FILES[1]:
                found.append(os.path.relpath(os.path.join(parent, name), folder))
    return sorted(found)


def enlarged(image):
    """`image` (uint8 [H, W, 3]) scaled up by a whole factor to at least READABLE_WIDTH, pixels kept sharp."""
    picture = Image.fromarray(image)
    factor = -(-READABLE_WIDTH // picture.width)  # ceil
    return picture.resize((picture.width * factor, picture.height * factor), Image.NEAREST) if factor > 1 else picture


def show_image(slot, result, key):
    """The image (small ones enlarged on screen) and a download of it at its true size."""
    with slot.container():
        st.image(enlarged(result["image"]), caption=f"seed {result['seed']}", output_format="PNG")  # lossless
        st.download_button("Download PNG", result["png"], file_name=result["file_name"], mime="image/png",
                           key=key, on_click="ignore")


def sidebar(defaults):
    """Model and embeddings; returns the pipeline (None when it cannot be loaded), the loaded embeddings and the
    config's image side."""
    st.sidebar.header("Model")
    config = st.sidebar.text_input("Config", defaults.config, key="config")
    weight = st.sidebar.text_input("Weights (file or diffusers folder; empty: the config's own, if it names one)",
                                   defaults.weight, key="weight")
    try:
        _, precision = start_device(defaults.device_target, defaults.precision)
        config_weight, side = sampling_defaults(load_config(config))
        pipeline = load_pipeline(config, weight.strip() or config_weight, precision)
    except USER_ERRORS as e:
        st.sidebar.error(f"Cannot load the model: {e}")
        return None, [], None

    st.sidebar.header("Learned words")
    folder = st.sidebar.text_input("Folder of training runs", defaults.embeddings_dir, key="embeddings_dir")
    options = find_embeddings(folder) if os.path.isdir(folder) else []
    if not options:
        st.sidebar.caption(f"No .ckpt / .safetensors embeddings found under {folder!r}.")
    chosen = [os.path.join(folder, name) for name in st.sidebar.multiselect("Embeddings", options, key="embeddings")]
    extra = st.sidebar.text_input("Or an embedding path", "", key="embedding_path").strip()
    paths = chosen + ([extra] if extra else [])

    embeddings = []
    for path in paths:
        try:
            embedding = load_embedding(path)
            if any(e.token == embedding.token for e in embeddings):
                raise SamplingError(f"{path}: its token {embedding.token} is taken by another chosen embedding")
            pipeline.add_embedding(embedding)
        except USER_ERRORS as e:
            st.sidebar.error(str(e))
            continue
        embeddings.append(embedding)
        st.sidebar.success(embedding.describe())
    return pipeline, embeddings, side


def prompt_box(tokens):
    """The prompt; while the user has not edited it, it follows the loaded words ("a photo of <toy>")."""
    default = f"a photo of {tokens}" if tokens else "a photo of a cat"
    state = st.session_state
    if state.get("prompt") in (None, state.get("prompt_default")):
        state["prompt"] = default
    state["prompt_default"] = default
    return st.text_area("Prompt", key="prompt")


def main():
    st.set_page_config(page_title="SDXL textual inversion", layout="wide")
    st.title("SDXL with learned words")
    defaults = page_defaults(sys.argv[1:])
    pipeline, embeddings, side = sidebar(defaults)
    if pipeline is None:
        st.info("Pick a config and its weights in the sidebar.")
        return

    tokens = " ".join(e.token for e in embeddings)
    prompt = prompt_box(tokens)
    negative_prompt = st.text_input("Negative prompt (empty: SDXL's zero embedding)", "", key="negative_prompt")
    cols = st.columns(4)
    sampler_name = cols[0].selectbox("Sampler", list(SAMPLERS), key="sampler")
    steps = cols[1].number_input("Steps", 1, 1000, defaults.sample_step, key="steps")
    guidance_scale = cols[2].number_input("Guidance scale", 0.0, 30.0, 5.0, 0.5, key="guidance_scale")
    seed = cols[3].number_input("Seed", 0, 2**31 - 1, 42, key="seed")
    cols = st.columns(4)
    multiple = pipeline.size_multiple
    height = cols[0].number_input("Height", multiple, 4096, defaults.H or side, multiple, key="H")
    width = cols[1].number_input("Width", multiple, 4096, defaults.W or side, multiple, key="W")
    num_images = cols[2].number_input("Images", 1, 16, 1, key="num_images")
    generate = st.button("Generate", type="primary", key="generate")

    if embeddings and pipeline.prompts_without_placeholders([prompt]):
        st.warning(f"The prompt uses none of the learned words ({tokens}).")
    results = st.session_state.setdefault("results", [])
    status = st.empty()  # the progress bar, above the images
    columns = st.columns(4)
    slots = [columns[i % 4].empty() for i in range(16)]  # image i: column i % 4, row i // 4
    if not generate:
        for i, result in enumerate(results):
            show_image(slots[i], result, f"download-{i}")
        return

    results.clear()
    bar = status.progress(0.0, text="Sampling ...")
    metadata = {"prompt": prompt, "negative_prompt": negative_prompt, "sampler": sampler_name, "steps": steps,
                "guidance_scale": guidance_scale, "size": f"{height}x{width}",
                "embeddings": ", ".join(f"{e.token}={os.path.basename(e.source)}" for e in embeddings)}

    def progress(done, total):
        bar.progress(done / total, text=f"Sampling: step {done} of {total}")

    def on_image(i, image):
        result = {"image": image, "seed": seed + i, "file_name": f"sample_seed{seed + i}.png",
                  "png": png_bytes(image, dict(metadata, seed=seed + i))}
        results.append(result)
        show_image(slots[i], result, f"download-{i}")

    try:
        with warnings.catch_warnings():  # the unused-placeholder warning is shown above
            warnings.simplefilter("ignore")
            pipeline.generate(prompt, negative_prompt, sampler_name, int(steps), guidance_scale, int(height),
                             int(width), int(seed), int(num_images), progress=progress, on_image=on_image)
        bar.progress(1.0, text=f"Done: {len(results)} image(s)")
    except USER_ERRORS as e:
        bar.empty()
        st.error(str(e))


main()
