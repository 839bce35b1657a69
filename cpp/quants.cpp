// Type table: block size, bytes per block and name of every supported GGML type.
#include "quants.h"

namespace hl {

bool type_info(int type, TypeInfo* info) {
    switch (type) {
        case T_F32: *info = {1, 4, "F32"}; return true;
        case T_F16: *info = {1, 2, "F16"}; return true;
        case T_BF16: *info = {1, 2, "BF16"}; return true;
        case T_Q4_0: *info = {QK, sizeof(block_q4_0), "Q4_0"}; return true;
        case T_Q4_1: *info = {QK, sizeof(block_q4_1), "Q4_1"}; return true;
        case T_Q5_0: *info = {QK, sizeof(block_q5_0), "Q5_0"}; return true;
        case T_Q5_1: *info = {QK, sizeof(block_q5_1), "Q5_1"}; return true;
        case T_Q8_0: *info = {QK, sizeof(block_q8_0), "Q8_0"}; return true;
        case T_Q2_K: *info = {QK_K, sizeof(block_q2_K), "Q2_K"}; return true;
        case T_Q3_K: *info = {QK_K, sizeof(block_q3_K), "Q3_K"}; return true;
        case T_Q4_K: *info = {QK_K, sizeof(block_q4_K), "Q4_K"}; return true;
        case T_Q5_K: *info = {QK_K, sizeof(block_q5_K), "Q5_K"}; return true;
        case T_Q6_K: *info = {QK_K, sizeof(block_q6_K), "Q6_K"}; return true;
        default: return false;
    }
}

}  // namespace hl
