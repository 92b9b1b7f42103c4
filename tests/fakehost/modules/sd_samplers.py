"""modules/sd_samplers.py: visible_samplers() lists SamplerData with .name (display names)."""

from collections import namedtuple

SamplerData = namedtuple("SamplerData", ["name", "constructor", "aliases", "options"])
all_samplers = [SamplerData("Euler a", None, ["k_euler_a"], {}), SamplerData("Euler", None, ["k_euler"], {}),
                SamplerData("DDIM", None, ["ddim"], {})]


def visible_samplers():
    return list(all_samplers)
