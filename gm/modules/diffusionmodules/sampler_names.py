"""The diffusion samplers of `sampling.py` by the names that `gm.sampling`, the sampling command and the web page
take. Free of MindSpore imports, so that the command's --help and flag errors answer at once."""

SAMPLERS = {  # name -> sampler class in gm.modules.diffusionmodules.sampling
    "EulerEDM": "EulerEDMSampler",
    "EulerAncestral": "EulerAncestralSampler",
    "HeunEDM": "HeunEDMSampler",
    "DPMPP2M": "DPMPP2MSampler",
    "DPMPP2SAncestral": "DPMPP2SAncestralSampler",
    "LinearMultistep": "LinearMultistepSampler",
}
