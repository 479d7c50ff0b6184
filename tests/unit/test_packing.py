"""Golden vectors for the GPTQ bit layout, with the bits written out, and round trips."""

import pytest
import torch

from autoround.quantizer.formats.packing import (
    pack_gptq_qweight, pack_gptq_qzeros, pack_stream, unpack_gptq_qweight, unpack_gptq_qzeros, unpack_stream,
)


def u32(t):
    return [x & 0xFFFFFFFF for x in t.reshape(-1).tolist()]


def test_4bit_golden():
    # rows 0..7 of one column hold 0..7; row j sits at bits 4j..4j+3, least significant first:
    # 0111 0110 0101 0100 0011 0010 0001 0000 = 0x76543210
    assert u32(pack_stream(torch.arange(8).view(8, 1), 4)) == [0x76543210]
    # 0xF in row 7 only: 1111 0000 ... 0000 = 0xF0000000 (sign bit set: stored as a negative int32)
    v = torch.zeros(8, 1, dtype=torch.long)
    v[7] = 15
    packed = pack_stream(v, 4)
    assert packed.dtype == torch.int32 and packed.item() == -(2**28) and u32(packed) == [0xF0000000]


def test_2bit_golden():
    # 16 values 0,1,2,3,0,1,2,3,... -> each byte 11 10 01 00 = 0xE4
    assert u32(pack_stream(torch.arange(16).remainder(4).view(16, 1), 2)) == [0xE4E4E4E4]


def test_8bit_golden():
    assert u32(pack_stream(torch.tensor([[0x11], [0x22], [0x33], [0xFF]]), 8)) == [0xFF332211]


def test_3bit_cross_word_golden():
    # 32 values of 3 bits = 96 bits = 3 words. Value 10 straddles words 0/1 (2 low bits in bits 30-31 of
    # word 0, 1 high bit in bit 0 of word 1); value 21 straddles words 1/2 (1 low bit in bit 31 of word 1,
    # 2 high bits in bits 0-1 of word 2).
    v = torch.zeros(32, 1, dtype=torch.long)
    v[10] = 0b111
    assert u32(pack_stream(v, 3)) == [0b11 << 30, 0b1, 0]
    v = torch.zeros(32, 1, dtype=torch.long)
    v[21] = 0b101
    assert u32(pack_stream(v, 3)) == [0, 1 << 31, 0b10]
    v = torch.zeros(32, 1, dtype=torch.long)
    v[0], v[11], v[22], v[31] = 0b001, 0b011, 0b111, 0b110
    # value 11 starts at bit 33 (word 1 bit 1), value 22 at bit 66 (word 2 bit 2), value 31 at bit 93 (word 2 bit 29)
    assert u32(pack_stream(v, 3)) == [0b001, 0b011 << 1, (0b111 << 2) | (0b110 << 29)]


def test_sym4_qzeros_word():
    # symmetric 4-bit zero point 8 stored as zp - 1 = 7 in every nibble
    z = torch.full((3, 16), 7)
    assert set(u32(pack_gptq_qzeros(z, 4))) == {0x77777777}


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_round_trips(bits):
    g = torch.Generator().manual_seed(bits)
    q = torch.randint(0, 2**bits, (48, 96), generator=g, dtype=torch.uint8)  # [out, in]
    qweight = pack_gptq_qweight(q, bits)
    assert qweight.shape == (96 * bits // 32, 48) and qweight.dtype == torch.int32
    assert torch.equal(unpack_gptq_qweight(qweight, bits, 96), q)
    z = torch.randint(0, 2**bits, (3, 64), generator=g)
    qz = pack_gptq_qzeros(z, bits)
    assert qz.shape == (3, 64 * bits // 32)
    assert torch.equal(unpack_gptq_qzeros(qz, bits, 64).long(), z)
    # structured: all ones / all max / alternating
    for fill in (0, 2**bits - 1):
        s = torch.full((32, 5), fill, dtype=torch.uint8)
        assert torch.equal(unpack_stream(pack_stream(s, bits), bits, 32), s)


def test_bad_bits_and_lengths():
    with pytest.raises(ValueError, match="9-bit values cannot be packed"):
        pack_stream(torch.zeros(32, 1, dtype=torch.long), 9)
    with pytest.raises(ValueError, match="does not fill whole 32-bit words"):
        pack_stream(torch.zeros(12, 1, dtype=torch.long), 4)
