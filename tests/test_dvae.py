"""The DALL-E dVAE: architecture, and loading OpenAI-style whole-module pickles without dall_e or running code.

A miniature stand-in of OpenAI's ``dall_e`` package (tests/dall_e_standin, same classes and attributes, small
widths) is pickled whole with torch.save, like OpenAI's encoder.pkl / decoder.pkl, and loaded through fastig.
"""

import contextlib
import importlib
import io
import os
import pickle
import struct
import sys
import zlib
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from fastig.errors import CheckpointError
from fastig.models import dvae

STANDIN_DIR = str(Path(__file__).parent / "dall_e_standin")
SMALL_ENC = dict(n_hid=8, n_blk_per_group=2, input_channels=3, vocab_size=32)
SMALL_DEC = dict(n_init=8, n_hid=8, n_blk_per_group=2, output_channels=3, vocab_size=32)
CONTAINERS = {"zip": True, "legacy": False}  # torch.save's _use_new_zipfile_serialization


def _forget_dall_e():
    for name in [m for m in sys.modules if m == "dall_e" or m.startswith("dall_e.")]:
        del sys.modules[name]


@contextlib.contextmanager
def standin():
    """The stand-in dall_e package, importable only inside the block."""
    sys.path.insert(0, STANDIN_DIR)
    try:
        yield importlib.import_module("dall_e")
    finally:
        sys.path.remove(STANDIN_DIR)
        _forget_dall_e()


def _save(obj, path, container="zip"):
    torch.save(obj, path, _use_new_zipfile_serialization=CONTAINERS[container])
    return path


def _small_standins(dall_e, n_blk=2):
    torch.manual_seed(1)
    enc = dall_e.Encoder(**{**SMALL_ENC, "n_blk_per_group": n_blk})
    dec = dall_e.Decoder(**{**SMALL_DEC, "n_blk_per_group": n_blk})
    for p in [*enc.parameters(), *dec.parameters()]:
        if p.dim() == 1:  # OpenAI's biases start at zero; make them count in the comparisons
            nn.init.normal_(p, std=0.2)
    return enc, dec


IMAGE_SHAPES = [(2, 3, 16, 16), (1, 3, 8, 24), (1, 3, 24, 8)]
CODE_SHAPES = [(2, 32, 2, 2), (1, 32, 1, 3), (1, 32, 3, 1)]


@pytest.fixture(scope="module")
def openai_files(tmp_path_factory):
    """Stand-in pickles (zip and legacy, 1 and 2 blocks per group), with the stand-in's own outputs."""
    root = tmp_path_factory.mktemp("dvae")
    files = {}
    with standin() as dall_e:
        for n_blk in (1, 2):
            enc, dec = _small_standins(dall_e, n_blk)
            gen = torch.Generator().manual_seed(2)
            images = [torch.rand(s, generator=gen) for s in IMAGE_SHAPES]
            codes = [torch.softmax(3 * torch.randn(s, generator=gen), 1) for s in CODE_SHAPES]
            with torch.no_grad():
                expected = dict(
                    enc_state={k: v.clone() for k, v in enc.state_dict().items()},
                    dec_state={k: v.clone() for k, v in dec.state_dict().items()},
                    images=images, codes=codes,
                    logits=[enc(dall_e.map_pixels(x)) for x in images],
                    stats=[dec(c) for c in codes],
                )
            for container in CONTAINERS:
                files[container, n_blk] = dict(
                    expected,
                    encoder=_save(enc, root / f"encoder_{container}_{n_blk}.pkl", container),
                    decoder=_save(dec, root / f"decoder_{container}_{n_blk}.pkl", container),
                )
    assert "dall_e" not in sys.modules
    return files


# ----------------------------------------------------------------------------------------------------------------
# architecture
# ----------------------------------------------------------------------------------------------------------------


def test_full_size_parameter_counts():
    with torch.device("meta"):
        encoder, decoder = dvae.Encoder(), dvae.Decoder()
    assert sum(p.numel() for p in encoder.parameters()) == 53_786_240
    assert sum(p.numel() for p in decoder.parameters()) == 43_829_766


def test_full_size_layout_and_post_gain():
    with torch.device("meta"):
        encoder, decoder = dvae.Encoder(), dvae.Decoder()
    assert encoder.blocks.group_3.block_2.post_gain == decoder.blocks.group_1.block_1.post_gain == 1 / 64
    assert encoder.blocks.input.w.shape == (256, 3, 7, 7)
    assert encoder.blocks.group_4.block_1.res_path.conv_1.w.shape == (512, 1024, 3, 3)
    assert encoder.blocks.output.conv.w.shape == (8192, 2048, 1, 1)
    assert decoder.blocks.input.w.shape == (128, 8192, 1, 1)
    assert decoder.blocks.group_1.block_1.id_path.w.shape == (2048, 128, 1, 1)
    assert decoder.blocks.output.conv.w.shape == (6, 256, 1, 1)
    assert [type(m) for m in encoder.modules()].count(nn.MaxPool2d) == 3
    assert [type(m) for m in decoder.modules()].count(nn.Upsample) == 3


def test_small_output_shapes():
    encoder, decoder = dvae.Encoder(**SMALL_ENC), dvae.Decoder(**SMALL_DEC)
    with torch.no_grad():
        assert encoder(torch.rand(2, 3, 16, 24)).shape == (2, 32, 2, 3)
        assert decoder(torch.rand(2, 32, 2, 3)).shape == (2, 6, 16, 24)


def test_state_dict_keys_match_openai_layout():
    with standin() as dall_e:
        reference_enc, reference_dec = _small_standins(dall_e)
    assert list(dvae.Encoder(**SMALL_ENC).state_dict()) == list(reference_enc.state_dict())
    assert list(dvae.Decoder(**SMALL_DEC).state_dict()) == list(reference_dec.state_dict())


def test_decoder_embedding_split_and_linearity():
    decoder = dvae.Decoder(**SMALL_DEC).double()
    p = torch.softmax(torch.randn(2, 32, 3, 2, dtype=torch.float64), 1)
    q = torch.softmax(torch.randn(2, 32, 3, 2, dtype=torch.float64), 1)
    assert torch.equal(decoder.from_embedding(decoder.embed(p)), decoder(p))
    for t in (0.0, 0.3, 1.0):  # the embedding is affine, so convex mixtures of codes mix embeddings
        mixed = decoder.embed(t * p + (1 - t) * q)
        torch.testing.assert_close(mixed, t * decoder.embed(p) + (1 - t) * decoder.embed(q), rtol=1e-12, atol=1e-12)
    assert decoder.embed(p).shape == (2, 8, 3, 2)
    image = decoder.reconstruct(p)
    assert image.shape == (2, 3, 24, 16) and image.min() >= 0 and image.max() <= 1


def test_computes_in_the_input_dtype():
    encoder = dvae.Encoder(**SMALL_ENC)
    x = dvae.map_pixels(torch.rand(2, 3, 16, 16))
    out32, out64 = encoder(x), encoder(x.double())
    assert out32.dtype == torch.float32 and out64.dtype == torch.float64
    reference = encoder.double()(x.double())  # weights and input both float64
    assert torch.equal(out64, reference)
    torch.testing.assert_close(out32.double(), reference, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("bad,error", [
    (torch.rand(3, 16, 16), ValueError),
    (torch.rand(1, 4, 16, 16), ValueError),
    (torch.rand(1, 3, 12, 16), ValueError),
    (torch.zeros(1, 3, 16, 16, dtype=torch.int64), TypeError),
])
def test_encoder_input_validation(bad, error):
    with pytest.raises(error):
        dvae.Encoder(**SMALL_ENC)(bad)


def test_decoder_input_validation():
    decoder = dvae.Decoder(**SMALL_DEC)
    with pytest.raises(ValueError, match="32"):
        decoder(torch.rand(1, 31, 2, 2))
    with pytest.raises(ValueError, match="embedding"):
        decoder.from_embedding(torch.rand(1, 9, 2, 2))
    with pytest.raises(ValueError):
        dvae.Encoder(n_hid=6)  # blocks need widths divisible by 4
    with pytest.raises(ValueError):
        dvae.Decoder(vocab_size=0)


def test_pixel_maps():
    x = torch.rand(2, 3, 5, 7, dtype=torch.float64)
    mapped = dvae.map_pixels(x)
    assert mapped.min() >= 0.1 and mapped.max() <= 0.9
    torch.testing.assert_close(dvae.unmap_pixels(mapped), x, rtol=0, atol=1e-12)
    assert torch.equal(dvae.unmap_pixels(torch.tensor([0.0, 0.5, 1.0])), torch.tensor([0.0, 0.5, 1.0]))
    with pytest.raises(TypeError):
        dvae.map_pixels(torch.zeros(3, dtype=torch.uint8))


def test_codes():
    logits = torch.randn(2, 32, 3, 4)
    hard = dvae.hard_codes(logits)
    assert torch.equal(hard.argmax(1), logits.argmax(1)) and torch.equal(hard.sum(1), torch.ones(2, 3, 4))
    soft = dvae.soft_codes(logits, temperature=0.5)
    torch.testing.assert_close(soft.sum(1), torch.ones(2, 3, 4))
    assert torch.equal(soft.argmax(1), logits.argmax(1))
    with pytest.raises(ValueError):
        dvae.soft_codes(logits, temperature=0)


# ----------------------------------------------------------------------------------------------------------------
# loading OpenAI-style pickles
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("container,n_blk", [("zip", 1), ("zip", 2), ("legacy", 2)])
def test_loads_openai_pickles_identically(openai_files, container, n_blk):
    files = openai_files[container, n_blk]
    encoder, decoder = dvae.load_encoder(files["encoder"]), dvae.load_decoder(files["decoder"])
    assert "dall_e" not in sys.modules
    assert isinstance(encoder, dvae.Encoder) and isinstance(decoder, dvae.Decoder)
    assert encoder.n_blk_per_group == decoder.n_blk_per_group == n_blk
    for model, expected in ((encoder, files["enc_state"]), (decoder, files["dec_state"])):
        state = model.state_dict()
        assert list(state) == list(expected)
        assert all(torch.equal(state[k], expected[k]) for k in expected)
        assert not model.training and not any(p.requires_grad for p in model.parameters())
    with torch.no_grad():
        for x, logits in zip(files["images"], files["logits"]):
            assert torch.equal(encoder(dvae.map_pixels(x)), logits)
        for codes, stats in zip(files["codes"], files["stats"]):
            assert torch.equal(decoder(codes), stats)
        image = decoder.reconstruct(files["codes"][0])  # OpenAI's notebook recipe
        assert torch.equal(image, dvae.unmap_pixels(torch.sigmoid(files["stats"][0][:, :3])))


def test_loading_never_imports_dall_e(openai_files):
    sys.path.insert(0, STANDIN_DIR)  # importable, yet the loader must not import it
    try:
        dvae.load_encoder(openai_files["zip", 2]["encoder"])
        assert "dall_e" not in sys.modules
    finally:
        sys.path.remove(STANDIN_DIR)
        _forget_dall_e()


def test_wrong_kind_is_refused(openai_files):
    files = openai_files["zip", 2]
    with pytest.raises(CheckpointError, match="dall_e.encoder.Encoder"):
        dvae.load_decoder(files["encoder"])
    with pytest.raises(CheckpointError, match="dall_e.decoder.Decoder"):
        dvae.load_encoder(files["decoder"])


# ----------------------------------------------------------------------------------------------------------------
# refusing everything else
# ----------------------------------------------------------------------------------------------------------------


class _ShellPayload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class _EvalPayload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return eval, (f"__import__('pathlib').Path({str(self.marker)!r}).touch()",)


@pytest.mark.parametrize("container", list(CONTAINERS))
@pytest.mark.parametrize("payload,name", [(_ShellPayload, "system"), (_EvalPayload, "builtins.eval")])
def test_foreign_globals_are_refused_and_never_run(tmp_path, container, payload, name):
    marker = tmp_path / "ran"
    with standin() as dall_e:
        encoder, _ = _small_standins(dall_e, n_blk=1)
        encoder.blocks.group_2.block_1.res_path.conv_3.payload = payload(marker)  # deep inside the tree
        path = _save(encoder, tmp_path / "encoder.pkl", container)
        with pytest.raises(CheckpointError, match=name) as refused:
            dvae.load_encoder(path)
        assert str(path) in str(refused.value) and "refused" in str(refused.value)
        assert not marker.exists()
        # control: an ordinary unpickling of the same file does run the payload
        torch.load(path, weights_only=False)
        assert marker.exists()


def test_bare_malicious_pickle_is_refused(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "encoder.pkl"
    path.write_bytes(pickle.dumps(_ShellPayload(marker), protocol=2))
    with pytest.raises(CheckpointError, match="system"):
        dvae.load_encoder(path)
    assert not marker.exists()


def test_unknown_dall_e_class_is_refused(tmp_path):
    path = tmp_path / "decoder.pkl"
    path.write_bytes(b"\x80\x02cdall_e.decoder\nEvil\nq\x00)\x81q\x01}q\x02b.")  # dall_e.decoder.Evil()
    with pytest.raises(CheckpointError, match="dall_e.decoder.Evil"):
        dvae.load_decoder(path)


def test_other_torch_modules_are_refused(tmp_path):
    path = _save(nn.Sequential(nn.Linear(2, 2)), tmp_path / "encoder.pkl")
    with pytest.raises(CheckpointError, match="torch.nn.modules.linear.Linear"):
        dvae.load_encoder(path)


def _set_pool(encoder):
    encoder.blocks.group_2.pool.kernel_size = 3


def _set_post_gain(encoder):
    encoder.blocks.group_1.block_1.post_gain = 1.0


def _set_kw(encoder):
    encoder.blocks.group_3.block_1.res_path.conv_4.kw = 3


def _inplace_relu(encoder):
    encoder.blocks.output.relu.inplace = True


def _drop_block(encoder):
    del encoder.blocks.group_4.block_1


def _swap_identity(encoder):
    encoder.blocks.group_1.block_1.id_path = nn.Sequential()


@pytest.mark.parametrize("mutate,message", [
    (_set_pool, "kernel_size"), (_set_post_gain, "post_gain"), (_set_kw, "kw"), (_inplace_relu, "inplace"),
    (_drop_block, "submodules"), (_swap_identity, "Identity"),
])
def test_structure_must_match_fastig(tmp_path, mutate, message):
    with standin() as dall_e:
        encoder, _ = _small_standins(dall_e, n_blk=1)
        mutate(encoder)
        path = _save(encoder, tmp_path / "encoder.pkl")
    with pytest.raises(CheckpointError, match=message):
        dvae.load_encoder(path)


def test_missing_and_corrupt_files(tmp_path, openai_files):
    missing = tmp_path / "nope.pkl"
    with pytest.raises(CheckpointError, match="nope.pkl"):
        dvae.load_encoder(missing)
    for container in CONTAINERS:
        data = Path(openai_files[container, 1]["encoder"]).read_bytes()
        for name, content in [("half", data[: len(data) // 2]), ("tail", data[:-100]), ("empty", b""),
                              ("noise", os.urandom(4096))]:
            bad = tmp_path / f"{container}_{name}.pkl"
            bad.write_bytes(content)
            with pytest.raises(CheckpointError, match=bad.name):
                dvae.load_encoder(bad)


# ----------------------------------------------------------------------------------------------------------------
# conversion to plain state_dict files
# ----------------------------------------------------------------------------------------------------------------


def test_convert_writes_plain_state_dicts(tmp_path, openai_files):
    files = openai_files["legacy", 2]
    enc_path, dec_path = dvae.convert(files["encoder"], files["decoder"], tmp_path / "checkpoints")
    assert enc_path.name == dvae.ENCODER_FILE == "dvae_encoder.pt"
    assert dec_path.name == dvae.DECODER_FILE == "dvae_decoder.pt"
    assert sorted(os.listdir(tmp_path / "checkpoints")) == sorted([dvae.ENCODER_FILE, dvae.DECODER_FILE])
    for path, expected, model_class, config in ((enc_path, files["enc_state"], dvae.Encoder, SMALL_ENC),
                                               (dec_path, files["dec_state"], dvae.Decoder, SMALL_DEC)):
        state = torch.load(path, weights_only=True)
        assert type(state) is dict and list(state) == list(expected)
        assert all(torch.equal(state[k], expected[k]) for k in expected)
        model_class(**config).load_state_dict(state)  # plain: fits a freshly built module
    encoder, decoder = dvae.load_encoder(enc_path), dvae.load_decoder(dec_path)
    with torch.no_grad():
        assert torch.equal(encoder(dvae.map_pixels(files["images"][1])), files["logits"][1])
        assert torch.equal(decoder(files["codes"][2]), files["stats"][2])


def test_bad_state_dicts_are_refused(tmp_path):
    state = dvae.Encoder(**SMALL_ENC).state_dict()
    wrong_shape = dict(state, **{"blocks.group_2.block_1.res_path.conv_2.w": torch.zeros(4, 4, 1, 1)})
    missing = {k: v for k, v in state.items() if k != "blocks.group_3.block_2.res_path.conv_1.b"}
    extra = dict(state, **{"blocks.extra": torch.zeros(1)})
    integer = dict(state, **{"blocks.input.b": torch.zeros(8, dtype=torch.int64)})
    for name, bad, message in [("shape", wrong_shape, "conv_2.w"), ("missing", missing, "conv_1.b"),
                               ("extra", extra, "blocks.extra"), ("int", integer, "dtype"),
                               ("list", [1, 2], "list"), ("decoder", dvae.Decoder(**SMALL_DEC).state_dict(), "do not match")]:
        path = _save(bad, tmp_path / f"{name}.pt")
        with pytest.raises(CheckpointError, match=message):
            dvae.load_encoder(path)


def test_half_precision_state_dict_loads_as_float32(tmp_path):
    reference = dvae.Decoder(**SMALL_DEC)
    path = _save({k: v.half() for k, v in reference.state_dict().items()}, tmp_path / "half.pt")
    decoder = dvae.load_decoder(path)
    assert all(p.dtype == torch.float32 for p in decoder.parameters())
    assert torch.equal(decoder.blocks.input.w, reference.blocks.input.w.half().float())


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    encoder, decoder = dvae.Encoder(**SMALL_ENC), dvae.Decoder(**SMALL_DEC)
    x = dvae.map_pixels(torch.rand(2, 3, 16, 16))
    codes = torch.softmax(torch.randn(2, 32, 2, 2), 1)
    with torch.no_grad():
        torch.testing.assert_close(encoder.cuda()(x.cuda()).cpu(), encoder.cpu()(x), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(decoder.cuda()(codes.cuda()).cpu(), decoder.cpu()(codes), rtol=1e-4, atol=1e-4)
        half = encoder.cuda()(x.cuda().half())
        assert half.dtype == torch.float16
        torch.testing.assert_close(half.float().cpu(), encoder.cpu()(x), rtol=2e-2, atol=2e-2)


def test_allow_list_maps_only_to_inert_objects():
    """Every global a file may name resolves to a record class, a dtype marker, a plain container, or one of
    fastig's own small functions -- never to third-party code."""
    for name, target in dvae.ALLOWED_GLOBALS.items():
        if isinstance(target, type) and issubclass(target, dvae._Record):
            assert target.pickled_name == name
        elif isinstance(target, dvae._StorageType):
            assert name.endswith("Storage")
        elif target in (OrderedDict, set):
            assert name in ("collections.OrderedDict", "builtins.set")
        else:
            assert callable(target) and target.__module__ == "fastig.models.dvae", name


def test_aliased_tensors_become_independent_parameters(tmp_path):
    state = dvae.Encoder(**SMALL_ENC).state_dict()
    shared = state["blocks.group_1.block_1.res_path.conv_2.w"]
    state["blocks.group_1.block_1.res_path.conv_3.w"] = shared  # one storage in the file, used twice
    path = _save(state, tmp_path / "aliased.pt")
    encoder = dvae.load_encoder(path)
    conv_2, conv_3 = encoder.blocks.group_1.block_1.res_path.conv_2.w, encoder.blocks.group_1.block_1.res_path.conv_3.w
    assert torch.equal(conv_2, conv_3) and conv_2.data_ptr() != conv_3.data_ptr()


# ----------------------------------------------------------------------------------------------------------------
# bounded reading (issue 16, item 7) and a refused file changes nothing (item 15)
# ----------------------------------------------------------------------------------------------------------------

sys.path.insert(0, str(Path(__file__).parent))
from _limits import memory_limit  # noqa: E402


class _FakeStorage:
    """Pickled by persistent id as torch.save does: ('storage', type, key, location, numel)."""

    def __init__(self, numel):
        self.numel = numel


class _FakeTensor:
    def __init__(self, storage):
        self.storage = storage

    def __reduce__(self):
        return torch._utils._rebuild_tensor_v2, (self.storage, 0, (self.storage.numel,), (1,), False, OrderedDict())


class _StoragePickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, _FakeStorage):
            return ("storage", torch.FloatStorage, "0", "cpu", obj.numel)
        return None


def _metadata_pickle(obj) -> bytes:
    buffer = io.BytesIO()
    _StoragePickler(buffer, protocol=2).dump(obj)
    return buffer.getvalue()


def _deflated_zeros(n_mib: int) -> tuple[bytes, int]:
    """A raw deflate stream of n_mib MiB of zeros and its CRC-32, built from one fully flushed 1 MiB block
    repeated (a full flush resets the compressor, so the block is the same every time): ~1 kB per MiB."""
    packer = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = packer.compress(bytes(1 << 20)) + packer.flush(zlib.Z_FULL_FLUSH)
    crc = 0
    zeros = bytes(1 << 20)
    for _ in range(n_mib):
        crc = zlib.crc32(zeros, crc)
    return block * n_mib + packer.flush(zlib.Z_FINISH), crc


def _zip(entries) -> bytes:
    """A zip archive written by hand from (name, method, data as stored, uncompressed size, crc) entries, so that
    a record may inflate far beyond its compressed size."""
    out, central = b"", b""
    for name, method, data, size, crc in entries:
        name = name.encode()
        fields = struct.pack("<HHHHHIIIHH", 20, 0, method, 0, 0x21, crc, len(data), size, len(name), 0)
        central += struct.pack("<IH", 0x02014B50, 20) + fields + struct.pack("<HHHII", 0, 0, 0, 0, len(out)) + name
        out += struct.pack("<I", 0x04034B50) + fields + name + data
    end = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(entries), len(entries), len(central), len(out), 0)
    return out + central + end


def _stored(name, data):
    return name, 0, data, len(data), zlib.crc32(data)


def _bomb_archive(tmp_path, numel=1 << 28, bomb_the_pickle=False):
    """A torch.save-style zip whose single float storage record inflates to numel * 4 bytes (1 GiB by default)."""
    pickled = _metadata_pickle({"blocks.input.w": _FakeTensor(_FakeStorage(numel))})
    zeros, crc = _deflated_zeros(numel * 4 >> 20)
    entries = [_stored("archive/data.pkl", pickled), _stored("archive/byteorder", b"little"),
               ("archive/data/0", 8, zeros, numel * 4, crc)]
    if bomb_the_pickle:
        entries[0] = ("archive/data.pkl", 8, zeros, numel * 4, crc)
    path = tmp_path / "bomb.pt"
    path.write_bytes(_zip(entries))
    return path


@pytest.mark.parametrize("bomb_the_pickle", [False, True])
def test_a_zip_record_that_inflates_to_a_gibibyte_is_refused_before_reading(tmp_path, bomb_the_pickle):
    path = _bomb_archive(tmp_path, bomb_the_pickle=bomb_the_pickle)
    assert path.stat().st_size < (4 << 20)
    with memory_limit(300 << 20):
        with pytest.raises(CheckpointError, match=r"bomb.pt.*declares? 1,073,741,824 bytes.*more than"):
            dvae.load_decoder(path)


def test_a_legacy_file_declaring_a_huge_storage_is_refused_before_allocating(tmp_path):
    magic = pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2) + pickle.dumps(1001, protocol=2)
    sys_info = pickle.dumps({"protocol_version": 1001, "little_endian": True}, protocol=2)
    body = _metadata_pickle({"blocks.input.w": _FakeTensor(_FakeStorage(1 << 34))}) + pickle.dumps(["0"], protocol=2)
    path = tmp_path / "legacy_bomb.pt"
    path.write_bytes(magic + sys_info + body)  # 64 GiB declared, no data
    with memory_limit(300 << 20):
        with pytest.raises(CheckpointError, match=r"legacy_bomb.pt.*declares 68,719,476,736 bytes.*more than"):
            dvae.load_encoder(path)


def test_the_declared_size_bound_admits_openai_full_size_files():
    with torch.device("meta"):
        full = max(sum(p.numel() for p in model.parameters()) for model in (dvae.Encoder(), dvae.Decoder()))
    assert full == 53_786_240 and dvae.MAX_STORAGE_BYTES == 8 * full  # the larger model, even in float64


def _module_state():
    """Everything a pickle could reach and mutate through the allow-list, copied."""
    state = {}
    for name, target in dvae.ALLOWED_GLOBALS.items():
        if callable(target) and hasattr(target, "__defaults__"):
            state[name] = (target.__defaults__, target.__kwdefaults__, dict(target.__dict__))
        else:
            state[name] = dict(vars(target)) if hasattr(target, "__dict__") else repr(target)
    return state


_BUILD_ATTACKS = {
    # BUILD with a state dict on the shared storage marker: every later storage would have dtype "x"
    "storage marker": b"\x80\x02ctorch\nFloatStorage\n}X\x05\x00\x00\x00dtypeX\x01\x00\x00\x00xsb.",
    # BUILD with slot state on the stand-in function: metadata="x" by default refuses every later tensor
    "function defaults": b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\nN}X\x0c\x00\x00\x00__defaults__"
                         b"\x89NX\x01\x00\x00\x00x\x87s\x86b.",
    # BUILD with slot state on a record class: every later file would hold a 'dall_e.evil'
    "record class": b"\x80\x02cdall_e.utils\nConv2d\nN}X\x0c\x00\x00\x00pickled_name"
                    b"X\x0b\x00\x00\x00dall_e.evils\x86b.",
}


@pytest.mark.parametrize("attack", list(_BUILD_ATTACKS))
def test_a_refused_file_changes_no_module_state(tmp_path, openai_files, attack):
    before = _module_state()
    path = tmp_path / "decoder.pkl"
    path.write_bytes(_BUILD_ATTACKS[attack])
    with pytest.raises(CheckpointError, match="refused"):
        dvae.load_decoder(path)
    assert _module_state() == before
    files = openai_files["zip", 2]
    decoder = dvae.load_decoder(files["decoder"])  # a good file still loads in the same process
    with torch.no_grad():
        assert torch.equal(decoder(files["codes"][0]), files["stats"][0])


def test_a_pickle_cannot_resize_a_tensor_through_its_setstate(tmp_path):
    """BUILD on a tensor runs Tensor.__setstate__, whose set_() would resize the storage to any size."""
    class Resized(_FakeTensor):
        def __reduce__(self):
            rebuild, args = super().__reduce__()
            return rebuild, args, (_FakeTensor(self.storage), 0, (1 << 28,), (1,))  # state -> set_(*state)

    pickled = _metadata_pickle({"blocks.input.w": Resized(_FakeStorage(4))})
    path = tmp_path / "resize.pt"
    path.write_bytes(_zip([_stored("archive/data.pkl", pickled), _stored("archive/byteorder", b"little"),
                           _stored("archive/data/0", bytes(16))]))
    with memory_limit(300 << 20):
        with pytest.raises(CheckpointError, match="refused.*state of a Tensor"):
            dvae.load_decoder(path)
