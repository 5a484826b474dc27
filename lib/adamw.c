/* adamw.c: torch's AdamW update and gradient clipping, element by element.
 *
 * Written to follow torch's operation order so that a run compared with
 * torch differs only by rounding; parallel over elements, each element by
 * one thread, so the result is independent of the thread count.
 */
#include "adamw.h"

#include <math.h>
#include <stdlib.h>

#include "msg.h"

void adamw_init(adamw *o, size_t n, double beta1, double beta2, double eps,
                double weight_decay)
{
    o->beta1 = beta1;
    o->beta2 = beta2;
    o->eps = eps;
    o->weight_decay = weight_decay;
    o->step = 0;
    o->n = n;
    o->m = xcalloc(n ? n : 1, sizeof(float));
    o->v = xcalloc(n ? n : 1, sizeof(float));
}

void adamw_free(adamw *o)
{
    free(o->m);
    free(o->v);
    o->m = o->v = NULL;
}

void adamw_step(adamw *o, float *p, const float *g, double lr)
{
    o->step++;
    double bc1 = 1.0 - pow(o->beta1, (double)o->step);
    double bc2 = 1.0 - pow(o->beta2, (double)o->step);
    float decay = (float)(1.0 - lr * o->weight_decay);
    float w1 = (float)(1.0 - o->beta1);
    float b2 = (float)o->beta2, w2 = (float)(1.0 - o->beta2);
    float step_size = (float)(lr / bc1);
    float bc2_sqrt = (float)sqrt(bc2);
    float eps = (float)o->eps;
    float *m = o->m, *v = o->v;
    int64_t n = (int64_t)o->n;
#pragma omp parallel for schedule(static) if (n >= (1 << 15))
    for (int64_t i = 0; i < n; i++) {
        float gi = g[i];
        if (o->weight_decay != 0)
            p[i] *= decay;
        m[i] += w1 * (gi - m[i]);
        v[i] = v[i] * b2 + w2 * gi * gi;
        float denom = sqrtf(v[i]) / bc2_sqrt + eps;
        p[i] -= step_size * (m[i] / denom);
    }
}

double grad_norm(const float *g, size_t n)
{
    double s = 0;
    for (size_t i = 0; i < n; i++)
        s += (double)g[i] * g[i];
    return sqrt(s);
}

float grad_clip(float *g, size_t n, double norm, double max_norm)
{
    if (!(max_norm > 0))
        return 1.0f;
    float coef = (float)(max_norm / (norm + 1e-6));
    if (coef >= 1.0f)
        return 1.0f;
    for (size_t i = 0; i < n; i++)
        g[i] *= coef;
    return coef;
}
