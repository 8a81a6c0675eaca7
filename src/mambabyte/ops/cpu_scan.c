/* The selective scan of Mamba-1 on the CPU, in fp32: forward, backward and one decoding step.
 *
 * Built at first use by mambabyte/ops/cpu_kernels.py (gcc -O3 -march=native) and called through ctypes.
 * Channels are processed LANES at a time so that the compiler vectorises across channels, and every
 * state entry h[n][lane] stays in registers or L1 while the loop walks over time. Nothing of size
 * (batch, length, d_inner, d_state) is ever stored: the forward keeps the state at chunk boundaries and
 * the backward recomputes one chunk at a time.
 *
 * Layouts (all contiguous fp32): x, delta, y, grads (batch, length, d_inner); B, C (batch, length, d_state);
 * A_t (d_state, d_inner) i.e. A transposed; states (batch, d_inner, d_state);
 * checkpoints (batch, n_chunks, d_inner, d_state); keep (batch, length): 0 where a document starts, else 1.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define LANES 16

/* exp(x) accurate to ~2 ulp (Cephes polynomial), written so that the compiler vectorises it. */
static inline float exp_approx(float x) {
    x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
    const int32_t k = (int32_t)(x * 1.44269504088896341f + 128.5f) - 128;  /* round(x / ln 2); truncation is floor here */
    const float kf = (float)k;
    const float r = x - kf * 0.693359375f + kf * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    union { int32_t i; float f; } scale;
    scale.i = (k + 127) << 23;
    return p * scale.f;
}

static inline float silu(float v) { return v / (1.0f + exp_approx(-v)); }

/* softplus(v) = max(v, 0) + log(1 + exp(-|v|)), the log as 2 atanh(s) with s = t / (2 + t) <= 1/3, so that it vectorises. */
static inline float softplus(float v) {
    const float t = exp_approx(-fabsf(v));
    const float s = t / (2.0f + t), s2 = s * s;
    float p = 1.0f / 13.0f;
    p = p * s2 + 1.0f / 11.0f;
    p = p * s2 + 1.0f / 9.0f;
    p = p * s2 + 1.0f / 7.0f;
    p = p * s2 + 1.0f / 5.0f;
    p = p * s2 + 1.0f / 3.0f;
    p = p * s2 + 1.0f;
    return (v > 0.0f ? v : 0.0f) + 2.0f * s * p;
}

/* One block of `w` channels starting at d0 of batch row b, over all positions. */
static inline __attribute__((always_inline)) void forward_block(
    const int w, const int64_t b, const int64_t d0, const int64_t L, const int64_t D, const int64_t N,
    const float *x, const float *delta, const float *A_t, const float *Bm, const float *Cm, const float *h0,
    const float *keep, float *y, float *final_state, float *checkpoints, const int64_t chunk) {
    float h[N][LANES];
    for (int64_t n = 0; n < N; n++)
        for (int i = 0; i < w; i++) h[n][i] = h0 ? h0[(b * D + d0 + i) * N + n] : 0.0f;
    const int64_t n_chunks = (L + chunk - 1) / chunk;
    for (int64_t t = 0; t < L; t++) {
        if (checkpoints && t % chunk == 0) {
            float *ck = checkpoints + ((b * n_chunks + t / chunk) * D + d0) * N;
            for (int i = 0; i < w; i++)
                for (int64_t n = 0; n < N; n++) ck[i * N + n] = h[n][i];
        }
        const int64_t row = b * L + t;
        const float kp = keep ? keep[row] : 1.0f;
        const float *xt = x + row * D + d0, *dt = delta + row * D + d0;
        const float *Bt = Bm + row * N, *Ct = Cm + row * N;
        float dx[LANES], acc[LANES];
        for (int i = 0; i < w; i++) { dx[i] = dt[i] * xt[i]; acc[i] = 0.0f; }
        for (int64_t n = 0; n < N; n++) {
            const float *a = A_t + n * D + d0;
            const float bn = Bt[n], cn = Ct[n];
            for (int i = 0; i < w; i++) {
                h[n][i] = kp * exp_approx(dt[i] * a[i]) * h[n][i] + dx[i] * bn;
                acc[i] += cn * h[n][i];
            }
        }
        float *yt = y + row * D + d0;
        for (int i = 0; i < w; i++) yt[i] = acc[i];
    }
    for (int i = 0; i < w; i++)
        for (int64_t n = 0; n < N; n++) final_state[(b * D + d0 + i) * N + n] = h[n][i];
}

/* y_t = C_t . h_t over channel blocks [block_begin, block_end); checkpoints may be NULL (no backward). */
void scan_forward(const float *x, const float *delta, const float *A_t, const float *Bm, const float *Cm,
                  const float *h0, const float *keep, float *y, float *final_state, float *checkpoints,
                  int64_t batch, int64_t L, int64_t D, int64_t N, int64_t chunk,
                  int64_t block_begin, int64_t block_end) {
    for (int64_t blk = block_begin; blk < block_end; blk++) {
        const int64_t d0 = blk * LANES;
        const int64_t w = D - d0 < LANES ? D - d0 : LANES;
        for (int64_t b = 0; b < batch; b++) {
            if (w == LANES)
                forward_block(LANES, b, d0, L, D, N, x, delta, A_t, Bm, Cm, h0, keep, y, final_state, checkpoints, chunk);
            else
                forward_block((int)w, b, d0, L, D, N, x, delta, A_t, Bm, Cm, h0, keep, y, final_state, checkpoints, chunk);
        }
    }
}

static inline __attribute__((always_inline)) void backward_block(
    const int w, const int64_t b, const int64_t d0, const int64_t L, const int64_t D, const int64_t N,
    const float *x, const float *delta, const float *A_t, const float *Bm, const float *Cm, const float *keep,
    const float *checkpoints, const int64_t chunk, const float *grad_y, const float *grad_final,
    float *grad_x, float *grad_delta, float *grad_A_t, float *grad_B, float *grad_C, float *grad_h0,
    float *decays, float *states) {
    const int64_t n_chunks = (L + chunk - 1) / chunk;
    float g[N][LANES];  /* dLoss/dh_t through the future, i.e. already multiplied by decay_{t+1} */
    float gA[N][LANES];
    for (int64_t n = 0; n < N; n++)
        for (int i = 0; i < w; i++) {
            g[n][i] = grad_final ? grad_final[(b * D + d0 + i) * N + n] : 0.0f;
            gA[n][i] = 0.0f;
        }
    for (int64_t c = n_chunks - 1; c >= 0; c--) {
        const int64_t t0 = c * chunk, t1 = t0 + chunk < L ? t0 + chunk : L;
        const float *ck = checkpoints + ((b * n_chunks + c) * D + d0) * N;
        float h[N][LANES];
        for (int i = 0; i < w; i++)
            for (int64_t n = 0; n < N; n++) h[n][i] = ck[i * N + n];
        for (int64_t t = t0; t < t1; t++) {  /* recompute the chunk's decays and states */
            const int64_t row = b * L + t;
            const float kp = keep ? keep[row] : 1.0f;
            const float *xt = x + row * D + d0, *dt = delta + row * D + d0, *Bt = Bm + row * N;
            float *dec = decays + (t - t0) * N * LANES, *st = states + (t - t0 + 1) * N * LANES;
            for (int64_t n = 0; n < N; n++) {
                const float *a = A_t + n * D + d0;
                const float bn = Bt[n];
                for (int i = 0; i < w; i++) {
                    dec[n * LANES + i] = kp * exp_approx(dt[i] * a[i]);
                    h[n][i] = dec[n * LANES + i] * h[n][i] + dt[i] * xt[i] * bn;
                    st[n * LANES + i] = h[n][i];
                }
            }
        }
        for (int64_t n = 0; n < N; n++)  /* states[0] is the state before the chunk */
            for (int i = 0; i < w; i++) states[n * LANES + i] = ck[i * N + n];
        for (int64_t t = t1 - 1; t >= t0; t--) {
            const int64_t row = b * L + t;
            const float *xt = x + row * D + d0, *dt = delta + row * D + d0, *gy = grad_y + row * D + d0;
            const float *Bt = Bm + row * N, *Ct = Cm + row * N;
            const float *dec = decays + (t - t0) * N * LANES;
            const float *prev = states + (t - t0) * N * LANES, *cur = states + (t - t0 + 1) * N * LANES;
            float gx[LANES], gd[LANES];
            for (int i = 0; i < w; i++) { gx[i] = 0.0f; gd[i] = 0.0f; }
            for (int64_t n = 0; n < N; n++) {
                const float *a = A_t + n * D + d0;
                const float bn = Bt[n], cn = Ct[n];
                float gc = 0.0f, gb = 0.0f;
                for (int i = 0; i < w; i++) {
                    gc += gy[i] * cur[n * LANES + i];
                    const float gh = g[n][i] + gy[i] * cn;  /* dLoss/dh_t */
                    const float gdec = gh * prev[n * LANES + i] * dec[n * LANES + i];  /* times d decay / d(delta*A) */
                    gd[i] += gdec * a[i] + gh * bn * xt[i];
                    gA[n][i] += gdec * dt[i];
                    gx[i] += gh * dt[i] * bn;
                    gb += gh * dt[i] * xt[i];
                    g[n][i] = gh * dec[n * LANES + i];
                }
                grad_C[row * N + n] += gc;
                grad_B[row * N + n] += gb;
            }
            float *out_x = grad_x + row * D + d0, *out_d = grad_delta + row * D + d0;
            for (int i = 0; i < w; i++) { out_x[i] = gx[i]; out_d[i] = gd[i]; }
        }
    }
    for (int64_t n = 0; n < N; n++)
        for (int i = 0; i < w; i++) grad_A_t[n * D + d0 + i] += gA[n][i];
    if (grad_h0)
        for (int i = 0; i < w; i++)
            for (int64_t n = 0; n < N; n++) grad_h0[(b * D + d0 + i) * N + n] = g[n][i];
}

/* Gradients of scan_forward over channel blocks [block_begin, block_end).
 * grad_x, grad_delta, grad_h0 are written; grad_A_t (zeroed by the caller) and this worker's own
 * grad_B, grad_C (zeroed, summed over workers by the caller) are accumulated. Returns 0, or 1 if out of memory. */
int scan_backward(const float *x, const float *delta, const float *A_t, const float *Bm, const float *Cm,
                  const float *keep, const float *checkpoints, const float *grad_y, const float *grad_final,
                  float *grad_x, float *grad_delta, float *grad_A_t, float *grad_B, float *grad_C, float *grad_h0,
                  int64_t batch, int64_t L, int64_t D, int64_t N, int64_t chunk,
                  int64_t block_begin, int64_t block_end) {
    float *decays = malloc(sizeof(float) * chunk * N * LANES);
    float *states = malloc(sizeof(float) * (chunk + 1) * N * LANES);
    if (!decays || !states) { free(decays); free(states); return 1; }
    for (int64_t blk = block_begin; blk < block_end; blk++) {
        const int64_t d0 = blk * LANES;
        const int64_t w = D - d0 < LANES ? D - d0 : LANES;
        for (int64_t b = 0; b < batch; b++) {
            if (w == LANES)
                backward_block(LANES, b, d0, L, D, N, x, delta, A_t, Bm, Cm, keep, checkpoints, chunk, grad_y,
                               grad_final, grad_x, grad_delta, grad_A_t, grad_B, grad_C, grad_h0, decays, states);
            else
                backward_block((int)w, b, d0, L, D, N, x, delta, A_t, Bm, Cm, keep, checkpoints, chunk, grad_y,
                               grad_final, grad_x, grad_delta, grad_A_t, grad_B, grad_C, grad_h0, decays, states);
        }
    }
    free(decays);
    free(states);
    return 0;
}

/* One decoding position: delta = softplus(dt + dt_bias); h = exp(delta*A) h + delta x B;
 * y = (C . h + D x) * silu(z). x, dt, z, y (batch, d_inner); B, C (batch, d_state); A (d_inner, d_state). */
void scan_step(const float *x, const float *dt, const float *A, const float *Bm, const float *Cm,
               const float *Dv, const float *dt_bias, const float *z, const float *state, float *y,
               float *next_state, int64_t batch, int64_t D, int64_t N) {
    for (int64_t b = 0; b < batch; b++)
        for (int64_t d = 0; d < D; d++) {
            const int64_t i = b * D + d;
            const float v = dt[i] + dt_bias[d];
            const float delta = v > 20.0f ? v : softplus(v);
            const float *a = A + d * N, *h = state + i * N, *Bt = Bm + b * N, *Ct = Cm + b * N;
            float *hn = next_state + i * N;
            float acc = 0.0f;
            for (int64_t n = 0; n < N; n++) {
                hn[n] = exp_approx(delta * a[n]) * h[n] + delta * x[i] * Bt[n];
                acc += Ct[n] * hn[n];
            }
            y[i] = (acc + Dv[d] * x[i]) * silu(z[i]);
        }
}

/* One decoding position of the whole Mamba mixer after in_proj: causal conv + SiLU, x_proj, dt_proj,
 * softplus, the scan step with A = -exp(A_log), the D skip and the silu(z) gate.
 * xz (batch, 2*d_inner); conv_w (d_inner, K); conv states (batch, d_inner, K-1); x_proj_w (R+2N, d_inner);
 * dt_proj_w (d_inner, R); A_log (d_inner, N); ssm states (batch, d_inner, N); y (batch, d_inner). */
void mixer_step(const float *xz, const float *conv_w, const float *conv_b, const float *conv_state,
                const float *x_proj_w, const float *dt_proj_w, const float *dt_bias, const float *A_log,
                const float *Dv, const float *ssm_state, float *y, float *next_conv, float *next_ssm,
                int64_t batch, int64_t E, int64_t K, int64_t R, int64_t N) {
    float u[E], delta[E], gate[E], proj[R + 2 * N];
    for (int64_t b = 0; b < batch; b++) {
        const float *x_in = xz + b * 2 * E, *z = x_in + E;
        for (int64_t d = 0; d < E; d++) {
            const float *w = conv_w + d * K, *window = conv_state + (b * E + d) * (K - 1);
            float *next = next_conv + (b * E + d) * (K - 1);
            float acc = conv_b[d] + w[K - 1] * x_in[d];
            for (int64_t k = 0; k < K - 1; k++) acc += w[k] * window[k];
            for (int64_t k = 0; k + 1 < K - 1; k++) next[k] = window[k + 1];
            if (K > 1) next[K - 2] = x_in[d];
            u[d] = acc;
        }
        for (int64_t d = 0; d < E; d++) u[d] = silu(u[d]);
        for (int64_t j = 0; j < R + 2 * N; j++) {
            const float *w = x_proj_w + j * E;
            float acc = 0.0f;
            for (int64_t d = 0; d < E; d++) acc += w[d] * u[d];
            proj[j] = acc;
        }
        for (int64_t d = 0; d < E; d++) {
            float v = dt_bias[d];
            for (int64_t r = 0; r < R; r++) v += dt_proj_w[d * R + r] * proj[r];
            delta[d] = v;
        }
        for (int64_t d = 0; d < E; d++) {
            delta[d] = delta[d] > 20.0f ? delta[d] : softplus(delta[d]);
            gate[d] = silu(z[d]);
        }
        const float *Bt = proj + R, *Ct = proj + R + N;
        for (int64_t d = 0; d < E; d++) {
            const float *h = ssm_state + (b * E + d) * N, *a_log = A_log + d * N;
            float *hn = next_ssm + (b * E + d) * N;
            float acc = 0.0f;
            for (int64_t n = 0; n < N; n++) {
                hn[n] = exp_approx(-delta[d] * exp_approx(a_log[n])) * h[n] + delta[d] * u[d] * Bt[n];
                acc += Ct[n] * hn[n];
            }
            y[b * E + d] = (acc + Dv[d] * u[d]) * gate[d];
        }
    }
}

/* y (rows) = W (rows, cols) x (cols), four rows at a time so that the sums run side by side. */
static void matvec(const float *W, const float *x, float *y, int64_t rows, int64_t cols) {
    int64_t j = 0;
    for (; j + 4 <= rows; j += 4) {
        const float *w0 = W + j * cols, *w1 = w0 + cols, *w2 = w1 + cols, *w3 = w2 + cols;
        float a0 = 0.0f, a1 = 0.0f, a2 = 0.0f, a3 = 0.0f;
        for (int64_t k = 0; k < cols; k++) {
            a0 += w0[k] * x[k];
            a1 += w1[k] * x[k];
            a2 += w2[k] * x[k];
            a3 += w3[k] * x[k];
        }
        y[j] = a0; y[j + 1] = a1; y[j + 2] = a2; y[j + 3] = a3;
    }
    for (; j < rows; j++) {
        float acc = 0.0f;
        for (int64_t k = 0; k < cols; k++) acc += W[j * cols + k] * x[k];
        y[j] = acc;
    }
}

/* One decoding position of a whole pre-norm residual block: out = h + out_proj(mixer(rmsnorm(h) * norm_w)).
 * hidden, out (batch, M); in_proj_w (2E, M); out_proj_w (M, E); the rest as in mixer_step. */
void block_step(const float *hidden, const float *norm_w, float eps, const float *in_proj_w, const float *conv_w,
                const float *conv_b, const float *conv_state, const float *x_proj_w, const float *dt_proj_w,
                const float *dt_bias, const float *A_log, const float *Dv, const float *ssm_state,
                const float *out_proj_w, float *out, float *next_conv, float *next_ssm,
                int64_t batch, int64_t M, int64_t E, int64_t K, int64_t R, int64_t N) {
    float normed[M], xz[2 * E], y[E];
    for (int64_t b = 0; b < batch; b++) {
        const float *h = hidden + b * M;
        float sum_sq = 0.0f;
        for (int64_t m = 0; m < M; m++) sum_sq += h[m] * h[m];
        const float scale = 1.0f / sqrtf(sum_sq / (float)M + eps);
        for (int64_t m = 0; m < M; m++) normed[m] = h[m] * scale * norm_w[m];
        matvec(in_proj_w, normed, xz, 2 * E, M);
        mixer_step(xz, conv_w, conv_b, conv_state + b * E * (K - 1), x_proj_w, dt_proj_w, dt_bias, A_log, Dv,
                   ssm_state + b * E * N, y, next_conv + b * E * (K - 1), next_ssm + b * E * N, 1, E, K, R, N);
        matvec(out_proj_w, y, out + b * M, M, E);
        for (int64_t m = 0; m < M; m++) out[b * M + m] += h[m];
    }
}
