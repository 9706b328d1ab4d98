"""Hostile generation requests against the runtime: each is refused before any engine runs, with one error that
names the argument and what is allowed (0 is an error, not "the default"; non-finite guidance never runs)."""

import math

import numpy as np
import pytest

from diffkiln.errors import DiffkilnError
from diffkiln.runtime import Pipeline

CASES = [
    # (keyword arguments, error text fragment)
    (dict(height=0), r"height=0; expected a positive integer"),
    (dict(width=-64), r"width=-64; expected a positive integer"),
    (dict(height=64.0), r"height=64.0; expected a positive integer"),
    (dict(height=True), r"height=True; expected a positive integer"),
    (dict(height=40), r"height=40 is not a multiple of 16"),
    (dict(width=4096), r"width=4096 is outside the range these engines were built for: \[32, 128\]"),
    (dict(num_inference_steps=0), r"num_inference_steps=0; expected a positive integer"),
    (dict(num_inference_steps=-1), r"num_inference_steps=-1; expected a positive integer"),
    (dict(num_inference_steps=1001), r"num_inference_steps=1001; this scheduler takes at most 1000"),
    (dict(num_inference_steps=10**6), r"at most 1000"),
    (dict(num_inference_steps=2.5), r"num_inference_steps=2.5; expected a positive integer"),
    (dict(guidance_scale=math.nan), r"guidance_scale=nan; expected a finite number"),
    (dict(guidance_scale=math.inf), r"guidance_scale=inf; expected a finite number"),
    (dict(guidance_scale=-math.inf), r"guidance_scale=-inf; expected a finite number"),
    (dict(guidance_scale="4.5"), r"guidance_scale='4.5'; expected a finite number"),
    (dict(num_images_per_prompt=0), r"num_images_per_prompt=0; expected a positive integer"),
    (dict(num_images_per_prompt=10**7), r"need .* GiB for the decoded pixels alone"),
    (dict(seed=-1), r"seed=-1; expected an integer in \[0, 2\*\*63\)"),
    (dict(seed=2**64), r"seed=.*; expected an integer in \[0, 2\*\*63\)"),
    (dict(seed="1"), r"seed='1'; expected an integer"),
    (dict(prompt=None), r"prompt: expected a string or a non-empty list of strings, got None"),
    (dict(prompt=[]), r"prompt: expected a string or a non-empty list of strings"),
    (dict(prompt=["a", None]), r"prompt: expected a string or a non-empty list of strings"),
    (dict(prompt=["a", 3]), r"prompt: expected a string or a non-empty list of strings"),
    (dict(prompt="a red \ud800 circle"), r"prompt 0 is not valid text \(surrogates not allowed at position 6\)"),
    (dict(negative_prompt=None), r"negative_prompt: expected a string or a non-empty list of strings"),
    (dict(negative_prompt=["a", "b"]), r"2 negative prompts for 1 prompts"),
    (dict(output_type="jpeg"), r"output_type='jpeg'; expected 'pil', 'np' or 'latent'"),
    (dict(latents=np.zeros((1, 8, 4, 4), np.float32)), r"latents shape \(1, 8, 4, 4\); expected \(1, 8, 16, 16\)"),
    (dict(seed=1, generator=np.random.default_rng(0)), r"pass either seed or generator, not both"),
]


@pytest.fixture(scope="module")
def pipe(tiny_engines):
    return Pipeline.from_engines(tiny_engines)


@pytest.mark.parametrize(("kwargs", "error"), CASES, ids=[str(i) for i in range(len(CASES))])
def test_request_refused_before_any_work(pipe, kwargs, error):
    calls = []
    engines = pipe.engines
    pipe.engines = {k: _Counting(v, calls) for k, v in engines.items()}
    try:
        with pytest.raises(DiffkilnError, match=error):
            pipe(**{"prompt": "a red circle", "num_inference_steps": 1, **kwargs})
    finally:
        pipe.engines = engines
    assert calls == [], f"engines ran before the request was refused: {calls}"


class _Counting:
    def __init__(self, engine, calls):
        self.engine, self.calls, self.spec = engine, calls, engine.spec

    def __call__(self, feeds):
        self.calls.append(self.spec.name)
        return self.engine(feeds)


def test_video_request_zero_frames_refused(built_engines):
    """Video: 0 frames is an error naming the rule, not "the default"."""
    from diffkiln.runtime import load_pipeline

    out = built_engines("tiny-t2v-ms")
    pipe = load_pipeline(out)
    with pytest.raises(DiffkilnError, match=r"num_frames=0; expected a positive integer"):
        pipe("a cat", num_frames=0, num_inference_steps=1)
    with pytest.raises(DiffkilnError, match=r"guidance_scale=nan; expected a finite number"):
        pipe("a cat", guidance_scale=math.nan, num_inference_steps=1)
    with pytest.raises(DiffkilnError, match=r"--scheduler FlowMatchEulerDiscreteScheduler does not sample this "
                                            r"noise-prediction model"):
        load_pipeline(out, scheduler="FlowMatchEulerDiscreteScheduler")
