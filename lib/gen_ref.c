/* gen_ref.c: CPU references of lora-gen's decoding kernels (gen_ref.h). */
#include "gen_ref.h"

#include <math.h>
#include <stdlib.h>

#include "msg.h"

void gen_ref_linear(float *y, const float *res, int64_t ldy, const float *x,
                    int64_t ldx, const float *w, int64_t out, int64_t in,
                    int64_t n, float alpha)
{
    for (int64_t t = 0; t < n; t++)
        for (int64_t o = 0; o < out; o++) {
            double s = 0.0;
            for (int64_t k = 0; k < in; k++)
                s += (double)x[t * ldx + k] * w[o * in + k];
            double base = res ? res[t * ldy + o] : 0.0;
            y[t * ldy + o] = (float)(base + alpha * s);
        }
}

void gen_ref_attention(float *o, const float *q, const float *k, const float *v,
                       int32_t p, int nh, int nkv, int hd)
{
    int64_t kvd = (int64_t)nkv * hd;
    int grp = nh / nkv;
    double *s = xmalloc((size_t)(p + 1) * sizeof *s);
    for (int h = 0; h < nh; h++) {
        const float *qh = q + (int64_t)h * hd;
        int64_t g = h / grp;
        double mx = -INFINITY;
        for (int32_t j = 0; j <= p; j++) {
            double d = 0.0;
            for (int e = 0; e < hd; e++)
                d += (double)qh[e] * k[j * kvd + g * hd + e];
            s[j] = d / sqrt((double)hd);
            if (s[j] > mx)
                mx = s[j];
        }
        double sum = 0.0;
        for (int32_t j = 0; j <= p; j++) {
            s[j] = exp(s[j] - mx);
            sum += s[j];
        }
        for (int e = 0; e < hd; e++) {
            double acc = 0.0;
            for (int32_t j = 0; j <= p; j++)
                acc += s[j] * v[j * kvd + g * hd + e];
            o[(int64_t)h * hd + e] = (float)(acc / sum);
        }
    }
    free(s);
}
