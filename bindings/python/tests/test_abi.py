"""The ctypes mirror matches the generated header and the real library."""

import ctypes
import re
from pathlib import Path

import pytest

import kvmesh
from kvmesh import _abi

HEADER = Path(__file__).resolve().parents[3] / "plugin" / "include" / "kvmesh.h"


def header_struct_fields(name):
    text = HEADER.read_text()
    m = re.search(r"typedef struct %s \{(.*?)\} %s;" % (name, name), text, re.S)
    assert m, f"{name} not in {HEADER}"
    body = re.sub(r"//[^\n]*", "", m.group(1))
    fields = []
    for decl in body.split(";"):
        decl = " ".join(decl.split())
        if not decl:
            continue
        fp = re.search(r"\(\*(\w+)\)", decl)
        if fp:
            fields.append(fp.group(1))
        else:
            fields.append(re.sub(r"\[.*\]", "", decl).split()[-1].lstrip("*"))
    return fields


@pytest.mark.parametrize(
    "name,cls",
    [
        ("KvmeshApi", _abi.Api),
        ("KvmeshContextConfig", _abi.ContextConfig),
        ("KvmeshLayoutSpec", _abi.LayoutSpec),
        ("KvmeshOpStatus", _abi.OpStatus),
        ("KvmeshBlockFailure", _abi.BlockFailure),
        ("KvmeshReceived", _abi.Received),
        ("KvmeshStats", _abi.Stats),
        ("KvmeshStoreConfig", _abi.StoreConfig),
        ("KvmeshNamespace", _abi.Namespace),
        ("KvmeshBlockKey", _abi.BlockKey),
        ("KvmeshStoreStats", _abi.StoreStats),
    ],
)
def test_ctypes_mirror_follows_the_header(name, cls):
    assert [f[0] for f in cls._fields_] == header_struct_fields(name)


def test_library_gives_abi_1_1_with_push_and_the_store():
    a = kvmesh.load_library()
    assert (a.abi_major, a.abi_minor) == (kvmesh.ABI_MAJOR, kvmesh.ABI_MINOR) == (1, 1)
    assert a.struct_size == ctypes.sizeof(_abi.Api)
    caps = kvmesh.capabilities()
    for cap in (kvmesh.CAP_PUSH, kvmesh.CAP_HOST_MEMORY, kvmesh.CAP_LOOKUP, kvmesh.CAP_SAVE,
                kvmesh.CAP_LOAD):
        assert caps & cap
    assert not caps & kvmesh.CAP_GPU_MEMORY
    assert kvmesh.status_name(-10) == "KVMESH_STATUS_PEER_LOST"
    assert kvmesh.status_name(-17) == "KVMESH_STATUS_NOT_FOUND"
    assert kvmesh.from_status(-18, "x").__class__ is kvmesh.IntegrityError


def test_wrong_abi_major_is_refused_by_the_library():
    lib = ctypes.CDLL(str(_abi.load()[0]._name))
    get = lib.kvmesh_get_api
    get.restype = ctypes.c_int32
    t = _abi.Api()
    assert get(2, ctypes.sizeof(t), ctypes.byref(t)) == kvmesh.AbiMismatch.status
    size_1_0 = _abi.Api.store_context_create.offset
    assert get(1, size_1_0 - 8, ctypes.byref(t)) == kvmesh.AbiMismatch.status
    assert get(1, size_1_0, ctypes.byref(t)) == 0 and t.struct_size == size_1_0
    assert get(1, ctypes.sizeof(t), None) == kvmesh.NullPointer.status


def test_missing_library_names_the_places_tried(monkeypatch, tmp_path):
    monkeypatch.setenv("KVMESH_LIB", str(tmp_path / "nope.so"))
    with pytest.raises(kvmesh.LibraryNotFound, match="nope.so"):
        _abi.load()
