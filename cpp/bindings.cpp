// Python module hybridllm._core: thin, zero-copy wrappers over the C++ kernels.
//
// Only the checks that memory safety needs are done here (sizes, dtypes, contiguity, id range);
// hybridllm.kernels validates the user-facing API with friendlier messages. The GIL is released
// around all computation.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "block.h"
#include "dequant.h"
#include "matmul.h"
#include "quants.h"
#include "vecdot.h"

namespace py = pybind11;

namespace {

[[noreturn]] void raise(PyObject* type, const std::string& msg) {
    PyErr_SetString(type, msg.c_str());
    throw py::error_already_set();
}

hl::TypeInfo checked_type(int qtype) {
    hl::TypeInfo ti{};
    if (!hl::type_info(qtype, &ti))
        raise(PyExc_NotImplementedError, "GGML type " + std::to_string(qtype) + " is not supported");
    return ti;
}

int64_t checked_row_bytes(const hl::TypeInfo& ti, int64_t rows, int64_t cols) {
    if (rows < 0 || cols < 0) raise(PyExc_ValueError, "rows and cols must be >= 0");
    if (cols % ti.block_size != 0)
        raise(PyExc_ValueError, "cols=" + std::to_string(cols) + " is not a multiple of the " +
                                    ti.name + " block size " + std::to_string(ti.block_size));
    return hl::row_bytes(ti, cols);
}

bool c_contig(const py::array& a) { return (a.flags() & py::array::c_style) != 0; }

const uint8_t* raw_ptr(const py::array& raw, int64_t rows, int64_t rb) {
    if (!c_contig(raw)) raise(PyExc_ValueError, "raw must be C-contiguous");
    const int64_t want = rows * rb;
    if (static_cast<int64_t>(raw.nbytes()) != want)
        raise(PyExc_ValueError, "raw has " + std::to_string(raw.nbytes()) + " bytes, expected " +
                                    std::to_string(want));
    return static_cast<const uint8_t*>(raw.data());
}

template <class T>
T* typed_ptr(py::array& a, const char* what, int64_t size, const char* dtype, bool write) {
    if (!py::isinstance<py::array_t<T>>(a))
        raise(PyExc_ValueError, std::string(what) + " must have dtype " + dtype);
    if (!c_contig(a)) raise(PyExc_ValueError, std::string(what) + " must be C-contiguous");
    if (write && !a.writeable()) raise(PyExc_ValueError, std::string(what) + " is read-only");
    if (static_cast<int64_t>(a.size()) != size)
        raise(PyExc_ValueError, std::string(what) + " has " + std::to_string(a.size()) +
                                    " elements, expected " + std::to_string(size));
    return static_cast<T*>(a.mutable_data());
}

template <class T>
const T* typed_cptr(const py::array& a, const char* what, int64_t size, const char* dtype) {
    if (!py::isinstance<py::array_t<T>>(a))
        raise(PyExc_ValueError, std::string(what) + " must have dtype " + dtype);
    if (!c_contig(a)) raise(PyExc_ValueError, std::string(what) + " must be C-contiguous");
    if (static_cast<int64_t>(a.size()) != size)
        raise(PyExc_ValueError, std::string(what) + " has " + std::to_string(a.size()) +
                                    " elements, expected " + std::to_string(size));
    return static_cast<const T*>(a.data());
}

int threads_or_default(int n_threads) { return n_threads > 0 ? n_threads : hl::physical_cores(); }

void py_dequantize(const py::array& raw, int qtype, int64_t rows, int64_t cols, py::array out) {
    const hl::TypeInfo ti = checked_type(qtype);
    const int64_t rb = checked_row_bytes(ti, rows, cols);
    const uint8_t* src = raw_ptr(raw, rows, rb);
    float* dst = typed_ptr<float>(out, "out", rows * cols, "float32", true);
    const int nt = hl::physical_cores();
    py::gil_scoped_release nogil;
    hl::dequantize_rows(qtype, src, rb, rows, cols, dst, nt);
}

void py_matmul(const py::array& raw, int qtype, int64_t rows, int64_t cols, const py::array& x,
               py::array out, int n_threads, bool rows_alone) {
    const hl::TypeInfo ti = checked_type(qtype);
    const int64_t rb = checked_row_bytes(ti, rows, cols);
    const uint8_t* w = raw_ptr(raw, rows, rb);
    if (x.ndim() != 2 && x.ndim() != 1) raise(PyExc_ValueError, "x must be 1-D or 2-D");
    const int64_t n = x.ndim() == 2 ? x.shape(0) : 1;
    const float* xp = typed_cptr<float>(x, "x", n * cols, "float32");
    float* op = typed_ptr<float>(out, "out", n * rows, "float32", true);
    const int nt = threads_or_default(n_threads);
    py::gil_scoped_release nogil;
    hl::matmul(w, qtype, rows, cols, xp, n, op, nt, rows_alone);
}

void py_get_rows(const py::array& raw, int qtype, int64_t rows, int64_t cols, const py::array& ids,
                 py::array out) {
    const hl::TypeInfo ti = checked_type(qtype);
    const int64_t rb = checked_row_bytes(ti, rows, cols);
    const uint8_t* src = raw_ptr(raw, rows, rb);
    if (ids.ndim() != 1) raise(PyExc_ValueError, "ids must be 1-D");
    const int64_t k = ids.shape(0);
    const int64_t* id = typed_cptr<int64_t>(ids, "ids", k, "int64");
    for (int64_t i = 0; i < k; ++i)
        if (id[i] < 0 || id[i] >= rows)
            raise(PyExc_IndexError, "row id " + std::to_string(id[i]) + " out of range [0, " +
                                        std::to_string(rows) + ")");
    float* dst = typed_ptr<float>(out, "out", k * cols, "float32", true);
    const int nt = hl::physical_cores();
    py::gil_scoped_release nogil;
    hl::get_rows(qtype, src, rows, cols, id, k, dst, nt);
}

uint64_t py_stream_read(const py::array& buf, int n_threads) {
    if (!c_contig(buf)) raise(PyExc_ValueError, "buf must be C-contiguous");
    const auto* p = static_cast<const uint8_t*>(buf.data());
    const int64_t n = static_cast<int64_t>(buf.nbytes());
    const int nt = threads_or_default(n_threads);
    py::gil_scoped_release nogil;
    return hl::stream_read(p, n, nt);
}

std::string simd_path() {
    std::string s = hl::simd_path_compiled();
    if (hl::force_scalar()) s = "scalar (forced; built with " + s + ")";
    return s;
}

}  // namespace

PYBIND11_MODULE(_core, m) {
    m.doc() = "hybridllm C++ kernels: GGML dequantization, quantized matmul, row gathers";
    hl::register_block(m);  // _core.Block (block.cpp)
    m.def("dequantize", &py_dequantize, py::arg("raw"), py::arg("qtype"), py::arg("rows"),
          py::arg("cols"), py::arg("out"),
          "out[rows, cols] = dequantized raw (rows x row_bytes GGML bytes).");
    m.def("matmul", &py_matmul, py::arg("raw"), py::arg("qtype"), py::arg("rows"), py::arg("cols"),
          py::arg("x"), py::arg("out"), py::arg("n_threads") = 0, py::arg("rows_alone") = false,
          "out[n, rows] = x[n, cols] @ W.T; n_threads <= 0 means physical cores; rows_alone: each\n"
          "row computed with the arithmetic of a one-row call (independent of the other rows).");
    m.def("get_rows", &py_get_rows, py::arg("raw"), py::arg("qtype"), py::arg("rows"),
          py::arg("cols"), py::arg("ids"), py::arg("out"),
          "out[k, cols] = dequantized rows ids[k] (int64).");
    m.def("simd_path", &simd_path, "SIMD path of the kernels, e.g. 'avx2+fma+f16c' or 'scalar'.");
    m.def("float_lanes", &hl::float_lanes, "Float lanes of ggml's SIMD for this build's ISA (16 or 8).");
    m.def("physical_cores", &hl::physical_cores, "Physical cores in this process's CPU affinity.");
    m.def("stream_read", &py_stream_read, py::arg("buf"), py::arg("n_threads") = 0,
          "Read every byte of buf with n_threads threads; returns a checksum (bandwidth probe).");
    m.def("set_force_scalar", &hl::set_force_scalar, py::arg("on"),
          "Use the portable scalar matmul kernels even where SIMD ones exist (for tests).");
    m.def("type_info", [](int qtype) {
        const hl::TypeInfo ti = checked_type(qtype);
        return py::make_tuple(ti.block_size, ti.type_size, ti.name);
    }, py::arg("qtype"), "(block_size, type_size, name) of a supported GGML type id.");
}
