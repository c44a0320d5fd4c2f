//! The fp32 CPU backend: every [`Backend`] op is the `*_cpu` reference of its family.
//!
//! Activations and fp32 buffers are `Vec<f32>`, index buffers `Vec<i32>`; the weights are the
//! fp32 master buffer itself and the gradients a master-shaped `[f32]`, so a step copies no
//! weights. Each op slices its tensor out of the flat buffer with [`TensorAt::range`].

use anyhow::Result;

use crate::model::backend::{Backend, TensorAt};
use crate::ops::attention::{attention_bwd_cpu, attention_fwd_cpu, block_of, write_block};
use crate::ops::cross_entropy::{cross_entropy_cpu, metrics_cpu, StepMetrics};
use crate::ops::embedding::{embedding_bwd_cpu, embedding_fwd_cpu};
use crate::ops::gate::{gate_bwd_cpu, gate_fwd_cpu};
use crate::ops::gemm::{linear_bwd_input_cpu, linear_bwd_weight_cpu, linear_fwd_cpu};
use crate::ops::rmsnorm::{add_rmsnorm_fwd_cpu, rmsnorm_bwd_cpu, rmsnorm_fwd_cpu};
use crate::ops::rope::{qkv_rope_bwd_cpu, qkv_rope_fwd_cpu};
use crate::ops::swiglu::{swiglu_bwd_cpu, swiglu_fwd_cpu};

/// The CPU reference backend (multi-threaded through rayon and matrixmultiply).
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuBackend;

impl Backend for CpuBackend {
    type Act = Vec<f32>;
    type F32 = Vec<f32>;
    type I32 = Vec<i32>;
    type U8 = Vec<u8>;
    type Metrics = StepMetrics;
    type Weights = [f32];
    type Grads = [f32];

    fn alloc_act(&self, n: usize) -> Result<Vec<f32>> {
        Ok(vec![0.0; n])
    }

    fn alloc_f32(&self, n: usize) -> Result<Vec<f32>> {
        Ok(vec![0.0; n])
    }

    fn alloc_u8(&self, n: usize) -> Result<Vec<u8>> {
        Ok(vec![0; n])
    }

    fn alloc_i32(&self, n: usize) -> Result<Vec<i32>> {
        Ok(vec![0; n])
    }

    fn alloc_metrics(&self) -> Result<StepMetrics> {
        Ok(StepMetrics::default())
    }

    fn zero_metrics(&self, sums: &mut StepMetrics) -> Result<()> {
        *sums = StepMetrics::default();
        Ok(())
    }

    fn write_i32(&self, dst: &mut Vec<i32>, host: &[i32]) -> Result<()> {
        dst[..host.len()].copy_from_slice(host);
        Ok(())
    }

    fn write_f32(&self, dst: &mut Vec<f32>, host: &[f32]) -> Result<()> {
        dst[..host.len()].copy_from_slice(host);
        Ok(())
    }

    fn upload_act(&self, host: &[f32]) -> Result<Vec<f32>> {
        Ok(host.to_vec())
    }

    fn zero_act(&self, x: &mut Vec<f32>) -> Result<()> {
        x.fill(0.0);
        Ok(())
    }

    fn zero_grads_at(&self, g: &mut [f32], at: TensorAt) -> Result<()> {
        g[at.range()].fill(0.0);
        Ok(())
    }

    fn add_act(&self, dst: &mut Vec<f32>, src: &Vec<f32>, n: usize) -> Result<()> {
        dst[..n].iter_mut().zip(&src[..n]).for_each(|(a, b)| *a += b);
        Ok(())
    }

    fn broadcast_rows(&self, out: &mut Vec<f32>, row: &Vec<f32>, t: usize, d: usize) -> Result<()> {
        out[..t * d].chunks_exact_mut(d).for_each(|r| r.copy_from_slice(&row[..d]));
        Ok(())
    }

    fn weights_len(&self, w: &[f32]) -> usize {
        w.len()
    }

    fn grads_len(&self, g: &[f32]) -> usize {
        g.len()
    }

    fn download_f32(&self, x: &Vec<f32>) -> Result<Vec<f32>> {
        Ok(x.clone())
    }

    fn linear_fwd(&self, y: &mut Vec<f32>, x: &Vec<f32>, w: &[f32], w_at: TensorAt, residual: Option<&Vec<f32>>, t: usize, n: usize, k: usize) -> Result<()> {
        linear_fwd_cpu(y, x, &w[w_at.range()], residual.map(Vec::as_slice), t, n, k);
        Ok(())
    }

    fn linear_bwd_input(&self, dx: &mut Vec<f32>, dy: &Vec<f32>, w: &[f32], w_at: TensorAt, t: usize, n: usize, k: usize) -> Result<()> {
        linear_bwd_input_cpu(dx, dy, &w[w_at.range()], t, n, k);
        Ok(())
    }

    fn linear_bwd_weight(&self, dw: &mut [f32], dw_at: TensorAt, dy: &Vec<f32>, x: &Vec<f32>, t: usize, n: usize, k: usize, accumulate: bool) -> Result<()> {
        linear_bwd_weight_cpu(&mut dw[dw_at.range()], dy, x, t, n, k, accumulate);
        Ok(())
    }

    fn add_rmsnorm_fwd(&self, x: &mut Vec<f32>, y: &mut Vec<f32>, rstd: &mut Vec<f32>, z: &Vec<f32>, inj: Option<&Vec<f32>>, t: usize, d: usize) -> Result<()> {
        add_rmsnorm_fwd_cpu(x, y, rstd, z, inj.map(Vec::as_slice), t, d);
        Ok(())
    }

    fn rmsnorm_fwd(&self, y: &mut Vec<f32>, rstd: &mut Vec<f32>, x: &Vec<f32>, t: usize, d: usize) -> Result<()> {
        rmsnorm_fwd_cpu(y, rstd, x, t, d);
        Ok(())
    }

    fn rmsnorm_bwd(&self, dx: &mut Vec<f32>, dy: &Vec<f32>, x: &Vec<f32>, rstd: &Vec<f32>, t: usize, d: usize) -> Result<()> {
        rmsnorm_bwd_cpu(dx, dy, x, rstd, t, d);
        Ok(())
    }

    fn qkv_rope_fwd(&self, gqkv: &mut Vec<f32>, pos: &Vec<i32>, t: usize, nh: usize) -> Result<()> {
        qkv_rope_fwd_cpu(gqkv, pos, t, nh);
        Ok(())
    }

    /// The references take q, k, v as separate tensors, copied out of gqkv's blocks; the
    /// attention's output `a` lives only until the gate has read it.
    fn attention_fwd(&self, y: &mut Vec<f32>, lse: &mut Vec<f32>, gqkv: &Vec<f32>, cu_seqlens: &Vec<i32>, prefix_lens: &Vec<i32>, t: usize, nh: usize) -> Result<()> {
        let [q, k, v] = [1, 2, 3].map(|j| block_of(gqkv, j, nh));
        let mut a = vec![0.0; q.len()];
        attention_fwd_cpu(&mut a, lse, &q, &k, &v, cu_seqlens, prefix_lens, t, nh);
        gate_fwd_cpu(y, gqkv, &a, t, nh);
        Ok(())
    }

    fn attention_bwd(&self, dgqkv: &mut Vec<f32>, dy: &Vec<f32>, gqkv: &Vec<f32>, y: &Vec<f32>, lse: &Vec<f32>, cu_seqlens: &Vec<i32>, prefix_lens: &Vec<i32>, pos: &Vec<i32>, t: usize, nh: usize) -> Result<()> {
        let [q, k, v] = [1, 2, 3].map(|j| block_of(gqkv, j, nh));
        let (mut da, mut delta) = (vec![0.0; q.len()], vec![0.0; t * nh]);
        gate_bwd_cpu(dgqkv, &mut da, &mut delta, dy, gqkv, y, t, nh);
        let mut grads = [(); 3].map(|_| vec![0.0; q.len()]);
        let [dq, dk, dv] = &mut grads;
        attention_bwd_cpu(dq, dk, dv, &da, &q, &k, &v, &delta, lse, cu_seqlens, prefix_lens, t, nh);
        for (j, grad) in [1, 2, 3].into_iter().zip(&grads) {
            write_block(dgqkv, j, grad, nh);
        }
        qkv_rope_bwd_cpu(dgqkv, pos, t, nh);
        Ok(())
    }

    fn swiglu_fwd(&self, out: &mut Vec<f32>, gate_up: &Vec<f32>, t: usize, i: usize) -> Result<()> {
        swiglu_fwd_cpu(out, gate_up, t, i);
        Ok(())
    }

    fn swiglu_bwd(&self, dgate_up: &mut Vec<f32>, dout: &Vec<f32>, gate_up: &Vec<f32>, t: usize, i: usize) -> Result<()> {
        swiglu_bwd_cpu(dgate_up, dout, gate_up, t, i);
        Ok(())
    }

    fn embedding_fwd(&self, out: &mut Vec<f32>, tokens: &Vec<i32>, w: &[f32], w_at: TensorAt, t: usize, d: usize, scale: f32) -> Result<()> {
        embedding_fwd_cpu(out, tokens, &w[w_at.range()], t, d, scale);
        Ok(())
    }

    fn prepare_token_order(&self, _: &[i32], _: usize) -> Result<()> {
        Ok(()) // the reference sums in t order as it goes
    }

    fn embedding_bwd(&self, dw: &mut [f32], dw_at: TensorAt, dout: &Vec<f32>, tokens: &Vec<i32>, t: usize, d: usize, scale: f32) -> Result<()> {
        embedding_bwd_cpu(&mut dw[dw_at.range()], dout, tokens, t, d, scale);
        Ok(())
    }

    fn lm_head_loss(&self, losses: &mut Vec<f32>, correct: &mut Vec<u8>, grads: Option<(&mut Vec<f32>, &mut [f32], bool)>, y: &Vec<f32>, w: &[f32], w_at: TensorAt, labels: &Vec<i32>, t: usize, v: usize, d: usize, grad_scale: &Vec<f32>) -> Result<()> {
        let w = &w[w_at.range()];
        let mut logits = vec![0.0f32; t * v]; // [T, V]
        linear_fwd_cpu(&mut logits, y, w, None, t, v, d);
        let mut dlogits = vec![0.0f32; t * v]; // [T, V]
        cross_entropy_cpu(&mut dlogits, losses, correct, &logits, labels, t, v, grad_scale[0]);
        if let Some((dy, dw, accumulate)) = grads {
            linear_bwd_weight_cpu(&mut dw[w_at.range()], &dlogits, y, t, v, d, accumulate);
            linear_bwd_input_cpu(dy, &dlogits, w, t, v, d);
        }
        Ok(())
    }

    fn step_metrics(&self, sums: &mut StepMetrics, losses: &Vec<f32>, correct: &Vec<u8>, labels: &Vec<i32>, cu_seqlens: &Vec<i32>, t: usize) -> Result<()> {
        *sums += metrics_cpu(losses, correct, labels, cu_seqlens, t);
        Ok(())
    }

    fn read_metrics(&self, sums: &StepMetrics) -> Result<StepMetrics> {
        Ok(*sums)
    }
}
