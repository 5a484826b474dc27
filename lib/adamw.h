/* adamw.h: AdamW with fp32 state, as torch.optim.AdamW computes it.
 *
 * One step, per element, in this order (torch's single-tensor and foreach
 * paths; decoupled weight decay):
 *     p  = p * (1 - lr * weight_decay)
 *     m  = m + (1 - beta1) * (g - m)
 *     v  = v * beta2 + (1 - beta2) * g * g
 *     p  = p - (lr / (1 - beta1^t)) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
 * with t the 1-based step count; the bias corrections are computed in double
 * as Python does, the per-element arithmetic in fp32.
 *
 * Global-norm clipping as torch.nn.utils.clip_grad_norm_: the norm of all
 * gradients; when max_norm > 0 every gradient is multiplied by
 * min(1, max_norm / (norm + 1e-6)).
 */
#ifndef ADAMW_H
#define ADAMW_H

#include <stddef.h>
#include <stdint.h>

typedef struct adamw {
    double beta1, beta2, eps, weight_decay;
    int64_t step; /* steps taken */
    size_t n;
    float *m; /* (n) first moment */
    float *v; /* (n) second moment */
} adamw;

/* Zeroed state for n parameters. */
void adamw_init(adamw *o, size_t n, double beta1, double beta2, double eps,
                double weight_decay);
void adamw_free(adamw *o);
/* One update of params with grad at learning rate lr; increments step. */
void adamw_step(adamw *o, float *params, const float *grad, double lr);

/* The L2 norm of grad (n), accumulated in double in a fixed order. */
double grad_norm(const float *grad, size_t n);
/* Clips grad to max_norm (when > 0) given its norm; returns the factor. */
float grad_clip(float *grad, size_t n, double norm, double max_norm);

#endif
