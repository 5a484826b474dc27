/* ops_ref.c: per-operation CPU references for the GPU kernels; see
 * ops_ref.h. Plain loops over the definitions, double accumulators. */
#include "ops_ref.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "msg.h"

void ops_rmsnorm_backward(float *dx, const float *dy, const float *x,
                          const float *w, const float *rstd, int64_t n, int d)
{
    for (int64_t t = 0; t < n; t++) {
        const float *xr = x + t * d, *gr = dy + t * d;
        double dot = 0.0;
        for (int i = 0; i < d; i++)
            dot += (double)w[i] * gr[i] * xr[i] * rstd[t];
        double mean = dot / d;
        for (int i = 0; i < d; i++) {
            double xh = (double)xr[i] * rstd[t];
            dx[t * d + i] = (float)(rstd[t] * ((double)w[i] * gr[i] - xh * mean));
        }
    }
}

static double sigmoid(double x) { return 1.0 / (1.0 + exp(-x)); }

void ops_swiglu_forward(float *h, const float *g, const float *u, int64_t n)
{
    for (int64_t i = 0; i < n; i++)
        h[i] = (float)(g[i] * sigmoid(g[i]) * u[i]);
}

void ops_swiglu_backward(float *dg, float *du, const float *dh,
                         const float *g, const float *u, int64_t n)
{
    for (int64_t i = 0; i < n; i++) {
        double s = sigmoid(g[i]);
        du[i] = (float)(dh[i] * g[i] * s);
        dg[i] = (float)(dh[i] * u[i] * s * (1.0 + g[i] * (1.0 - s)));
    }
}

/* Probabilities of query t, head h over keys start[t]..t into p (t-start+1);
 * returns the log-sum-exp of the scaled scores. */
static double attn_probs(double *p, const float *q, const float *k,
                         const int32_t *start, int64_t t, int h, int nh,
                         int nkv, int hd)
{
    int kh = h / (nh / nkv);
    double scale = 1.0 / sqrt((double)hd), mx = -INFINITY, sum = 0.0;
    const float *qv = q + (t * nh + h) * hd;
    for (int64_t j = start[t]; j <= t; j++) {
        const float *kv = k + (j * nkv + kh) * hd;
        double s = 0.0;
        for (int i = 0; i < hd; i++)
            s += (double)qv[i] * kv[i];
        s *= scale;
        p[j - start[t]] = s;
        if (s > mx)
            mx = s;
    }
    for (int64_t j = start[t]; j <= t; j++) {
        p[j - start[t]] = exp(p[j - start[t]] - mx);
        sum += p[j - start[t]];
    }
    for (int64_t j = start[t]; j <= t; j++)
        p[j - start[t]] /= sum;
    return mx + log(sum);
}

void ops_attention_forward(float *o, float *lse, const float *q,
                           const float *k, const float *v,
                           const int32_t *start, int64_t n, int nh, int nkv,
                           int hd)
{
    double *p = xmalloc((size_t)n * sizeof *p);
    double *acc = xmalloc((size_t)hd * sizeof *acc);
    int kh_div = nh / nkv;
    for (int64_t t = 0; t < n; t++)
        for (int h = 0; h < nh; h++) {
            double l = attn_probs(p, q, k, start, t, h, nh, nkv, hd);
            if (lse)
                lse[(int64_t)h * n + t] = (float)l;
            memset(acc, 0, (size_t)hd * sizeof *acc);
            for (int64_t j = start[t]; j <= t; j++) {
                const float *vv = v + (j * nkv + h / kh_div) * hd;
                for (int i = 0; i < hd; i++)
                    acc[i] += p[j - start[t]] * vv[i];
            }
            for (int i = 0; i < hd; i++)
                o[(t * nh + h) * hd + i] = (float)acc[i];
        }
    free(p);
    free(acc);
}

void ops_attention_backward(float *dq, float *dk, float *dv,
                            const float *dout, const float *q, const float *k,
                            const float *v, const int32_t *start, int64_t n,
                            int nh, int nkv, int hd)
{
    double *p = xmalloc((size_t)n * sizeof *p);
    double *dp = xmalloc((size_t)n * sizeof *dp);
    double *dkk = xcalloc((size_t)n * nkv * hd, sizeof *dkk);
    double *dvv = xcalloc((size_t)n * nkv * hd, sizeof *dvv);
    double scale = 1.0 / sqrt((double)hd);
    int g = nh / nkv;
    for (int64_t t = 0; t < n; t++)
        for (int h = 0; h < nh; h++) {
            int kh = h / g;
            const float *go = dout + (t * nh + h) * hd;
            const float *qv = q + (t * nh + h) * hd;
            attn_probs(p, q, k, start, t, h, nh, nkv, hd);
            double dsum = 0.0;
            for (int64_t j = start[t]; j <= t; j++) {
                const float *vv = v + (j * nkv + kh) * hd;
                double s = 0.0;
                for (int i = 0; i < hd; i++)
                    s += (double)go[i] * vv[i];
                dp[j - start[t]] = s;
                dsum += s * p[j - start[t]];
            }
            double *dqa = xcalloc((size_t)hd, sizeof *dqa);
            for (int64_t j = start[t]; j <= t; j++) {
                double pj = p[j - start[t]];
                double ds = pj * (dp[j - start[t]] - dsum) * scale;
                const float *kv = k + (j * nkv + kh) * hd;
                for (int i = 0; i < hd; i++) {
                    dqa[i] += ds * kv[i];
                    dkk[(j * nkv + kh) * hd + i] += ds * qv[i];
                    dvv[(j * nkv + kh) * hd + i] += pj * go[i];
                }
            }
            for (int i = 0; i < hd; i++)
                dq[(t * nh + h) * hd + i] = (float)dqa[i];
            free(dqa);
        }
    for (int64_t i = 0; i < n * nkv * hd; i++) {
        dk[i] = (float)dkk[i];
        dv[i] = (float)dvv[i];
    }
    free(p);
    free(dp);
    free(dkk);
    free(dvv);
}

double ops_xent(float *dx, const float *x, const float *w,
                const int32_t *targets, const float *weights, int64_t n,
                int d, int vocab, float grad_scale)
{
    double *lg = xmalloc((size_t)vocab * sizeof *lg);
    double *acc = xmalloc((size_t)d * sizeof *acc);
    double total = 0.0;
    for (int64_t t = 0; t < n; t++) {
        if (dx)
            memset(dx + t * d, 0, (size_t)d * sizeof *dx);
        if (targets[t] < 0)
            continue;
        double wt = weights ? weights[t] : 1.0, mx = -INFINITY, sum = 0.0;
        for (int c = 0; c < vocab; c++) {
            double s = 0.0;
            for (int i = 0; i < d; i++)
                s += (double)x[t * d + i] * w[(int64_t)c * d + i];
            lg[c] = s;
            if (s > mx)
                mx = s;
        }
        for (int c = 0; c < vocab; c++)
            sum += exp(lg[c] - mx);
        double lse = mx + log(sum);
        total += wt * (lse - lg[targets[t]]);
        if (!dx)
            continue;
        memset(acc, 0, (size_t)d * sizeof *acc);
        for (int c = 0; c < vocab; c++) {
            double gr = exp(lg[c] - lse) - (c == targets[t]);
            gr *= wt * grad_scale;
            for (int i = 0; i < d; i++)
                acc[i] += gr * w[(int64_t)c * d + i];
        }
        for (int i = 0; i < d; i++)
            dx[t * d + i] = (float)acc[i];
    }
    free(lg);
    free(acc);
    return total;
}

void ops_embedding(float *out, const float *table, const int32_t *ids,
                   int64_t n, int d)
{
    for (int64_t t = 0; t < n; t++)
        memcpy(out + t * d, table + (int64_t)ids[t] * d, (size_t)d * sizeof *out);
}

double ops_sumsq(const float *x, int64_t n)
{
    double s = 0.0;
    for (int64_t i = 0; i < n; i++)
        s += (double)x[i] * x[i];
    return s;
}
