"""--network_module lycoris.kohya: its network_args checked before any model loads."""
from __future__ import annotations

import inspect
import re

import pytest

from library.errors import UserError
from networks import network_args as network_args_lib
from networks.lycoris_args import LYCORIS_KEYS

lycoris_kohya = pytest.importorskip("lycoris.kohya")


def test_known_keys_are_exactly_what_lycoris_reads():
    """Our key list against the installed LyCORIS source: a LyCORIS upgrade that adds or drops a key fails here."""
    source = inspect.getsource(lycoris_kohya.create_network)
    read = set(re.findall(r'kwargs\.get\(\s*"([a-z0-9_]+)"', source))
    deprecated = set(__import__("lycoris.wrapper", fromlist=["deprecated_arg_dict"]).deprecated_arg_dict)
    assert read | deprecated == set(LYCORIS_KEYS)


@pytest.mark.parametrize("items", [
    ["algo=lokr", "factor=8", "conv_dim=4", "conv_alpha=2", "preset=attn-mlp", "dora_wd=True"],
    ["algo=loha", "use_tucker=False", "dropout=0.1", "rank_dropout=0.05", "module_dropout=0.1"],
    ["algo=diag-oft", "constraint=0.1", "rescaled=True"],
    ["algo=boft"], ["algo=ia3", "preset=ia3"], ["algo=full"], ["algo=locon", "dora_wd=True", "wd_on_output=False"],
])
def test_lycoris_recipes_pass(items):
    assert network_args_lib.validate("lycoris.kohya", items, "sdxl", network_dim=8, network_alpha=4)


@pytest.mark.parametrize("items, message", [
    (["algo=lokrr"], "did you mean 'lokr'"),
    (["algo=lokr", "facter=8"], "did you mean 'factor'"),
    (["algo=loha", "factor=8"], "factor does nothing with algo=loha"),
    (["algo=boft", "dora_wd=True"], "dora_wd does nothing with algo=boft"),
    (["dora_wd=1"], "True or False"),
    (["preset=attn-mpl"], "preset='attn-mpl'"),
    (["algo=lokr", "factor=0"], "factor='0'"),
    (["rank_dropout=2"], "rank_dropout='2'"),
    (["block_dims=4,4"], "networks.lora option"),
])
def test_lycoris_mistakes_are_named(items, message):
    with pytest.raises(UserError, match="--network_args") as err:
        network_args_lib.validate("lycoris.kohya", items, "sd1", network_dim=4, network_alpha=1)
    assert message in str(err.value)


def test_lycoris_flag_mistakes():
    with pytest.raises(UserError, match="--network_dropout"):
        network_args_lib.validate("lycoris.kohya", ["algo=lokr"], "sd1", network_dropout=0.1)
    with pytest.raises(UserError, match="--network_dim"):
        network_args_lib.validate("lycoris.kohya", ["algo=lokr"], "sd1", network_dim=0)
