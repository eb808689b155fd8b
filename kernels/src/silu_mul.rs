//! SwiGLU's gate: `silu(gate) * up` in one pass over memory, instead of a
//! SiLU pass, a temporary, and a multiply pass.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor, WithDType};

struct SiluMul;

fn fused<T: WithDType>(gate: &[T], up: &[T]) -> Vec<T> {
    gate.iter()
        .zip(up)
        .map(|(&g, &u)| {
            let g = g.to_f64() as f32;
            let u = u.to_f64() as f32;
            T::from_f64(f64::from(g / (1.0 + (-g).exp()) * u))
        })
        .collect()
}

fn fused_f32(gate: &[f32], up: &[f32]) -> Vec<f32> {
    gate.iter()
        .zip(up)
        .map(|(&g, &u)| g / (1.0 + (-g).exp()) * u)
        .collect()
}

impl CustomOp2 for SiluMul {
    fn name(&self) -> &'static str {
        "silu-mul"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (Some((a0, a1)), Some((b0, b1))) = (l1.contiguous_offsets(), l2.contiguous_offsets())
        else {
            candle_core::bail!("silu-mul: inputs must be contiguous");
        };
        if l1.shape() != l2.shape() {
            candle_core::bail!(
                "silu-mul: shapes differ: {:?} and {:?}",
                l1.shape(),
                l2.shape()
            );
        }
        let out = match (s1, s2) {
            (CpuStorage::F32(g), CpuStorage::F32(u)) => {
                CpuStorage::F32(fused_f32(&g[a0..a1], &u[b0..b1]))
            }
            (CpuStorage::F16(g), CpuStorage::F16(u)) => {
                CpuStorage::F16(fused(&g[a0..a1], &u[b0..b1]))
            }
            (CpuStorage::BF16(g), CpuStorage::BF16(u)) => {
                CpuStorage::BF16(fused(&g[a0..a1], &u[b0..b1]))
            }
            (CpuStorage::F64(g), CpuStorage::F64(u)) => {
                CpuStorage::F64(fused(&g[a0..a1], &u[b0..b1]))
            }
            _ => candle_core::bail!(
                "silu-mul: unsupported dtypes {:?}, {:?}",
                s1.dtype(),
                s2.dtype()
            ),
        };
        Ok((out, l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::fused::by_float_type!(s1.dtype(), "silu-mul", cuda::silu_mul(s1, l1, s2, l2))
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, PushKernelArg};
    use candle_core::cuda_backend::CudaDType;
    use candle_core::{CudaStorage, Layout, Result, Shape};

    use crate::fused::cuda::{elementwise, int, kernel, launched, output, view, SWIGLU};

    /// Rows, columns and row stride of a 2-D operand with contiguous rows.
    fn rows(l: &Layout) -> Result<(usize, usize, usize)> {
        let (n, c) = l.shape().dims2()?;
        let s = l.stride();
        if c > 1 && s[1] != 1 {
            candle_core::bail!("silu-mul: rows must be contiguous (strides {s:?})");
        }
        Ok((n, c, if n > 1 { s[0] } else { c }))
    }

    pub(super) fn silu_mul<T: CudaDType + DeviceRepr>(
        g: &CudaStorage,
        gl: &Layout,
        u: &CudaStorage,
        ul: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let ((n, c, gs), (un, uc, us)) = (rows(gl)?, rows(ul)?);
        if (n, c) != (un, uc) {
            candle_core::bail!(
                "silu-mul: shapes differ: {:?} and {:?}",
                gl.dims(),
                ul.dims()
            );
        }
        let dev = g.device().clone();
        let out = output::<T>(&dev, n * c)?;
        let func = kernel(&dev, SWIGLU, "silu_mul", g.dtype())?;
        let stream = dev.cuda_stream();
        let (gv, uv) = (view::<T>(g, gl)?, view::<T>(u, ul)?);
        let args = [
            int(n, "rows")?,
            int(c, "cols")?,
            int(gs, "stride")?,
            int(us, "stride")?,
        ];
        let mut b = stream.launch_builder(&func);
        b.arg(&gv).arg(&uv).arg(&out);
        for a in &args {
            b.arg(a);
        }
        // SAFETY: n × c elements at the operands' strides.
        launched(unsafe { b.launch(elementwise(n * c)) }.map(|_| ()))?;
        Ok((CudaStorage::wrap_cuda_slice(out, dev), Shape::from((n, c))))
    }
}

/// `silu(gate) * up`, fused. Both tensors must have the same shape and dtype
/// (f32, f64, f16 or bf16).
///
/// On CUDA, 2-D operands may have strided rows (the two halves of one fused
/// gate|up projection); others are made contiguous and keep their shape.
pub fn silu_mul(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if gate.device().is_cuda() && gate.rank() == 2 {
        return gate.apply_op2_no_bwd(up, &SiluMul);
    }
    if !gate.device().is_cpu() && !gate.device().is_cuda() {
        return silu_mul_reference(gate, up);
    }
    let shape = gate.shape().clone();
    let (gate, up) = (gate.contiguous()?, up.contiguous()?);
    if gate.device().is_cuda() {
        let cols = shape.dims().last().copied().unwrap_or(1);
        let flat = |t: &Tensor| t.reshape(((), cols));
        return flat(&gate)?
            .apply_op2_no_bwd(&flat(&up)?, &SiluMul)?
            .reshape(shape);
    }
    gate.apply_op2_no_bwd(&up, &SiluMul)
}

/// The reference: stock candle ops, computed in f32.
pub fn silu_mul_reference(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    let dtype = gate.dtype();
    let g = gate.to_dtype(DType::F32)?;
    let u = up.to_dtype(DType::F32)?;
    (candle_core::Tensor::silu(&g)? * u)?.to_dtype(dtype)
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor};
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::*;

    fn random(shape: &[usize], rng: &mut StdRng) -> Tensor {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| rng.random_range(-8.0f32..8.0)).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    #[test]
    fn matches_reference_on_random_inputs() {
        let mut rng = StdRng::seed_from_u64(17);
        for shape in [
            vec![1usize, 1, 7],
            vec![1, 5, 1536],
            vec![3, 17, 33],
            vec![2, 1, 4099],
        ] {
            let g = random(&shape, &mut rng);
            let u = random(&shape, &mut rng);
            for (dtype, tol) in [
                (DType::F32, 1e-5f32),
                (DType::F16, 2e-2),
                (DType::BF16, 1e-1),
            ] {
                let (g, u) = (g.to_dtype(dtype).unwrap(), u.to_dtype(dtype).unwrap());
                let got = silu_mul(&g, &u).unwrap();
                let want = silu_mul_reference(&g, &u).unwrap();
                assert_eq!(got.dtype(), dtype);
                assert_eq!(got.dims(), shape.as_slice());
                let diff = (got.to_dtype(DType::F32).unwrap() - want.to_dtype(DType::F32).unwrap())
                    .unwrap()
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                // Tolerance relative to the magnitude of the outputs (|x| up to ~64).
                assert!(diff <= tol * 64.0, "{dtype:?} {shape:?}: max diff {diff}");
            }
        }
    }

    #[test]
    fn strided_inputs_and_mismatched_shapes() {
        let mut rng = StdRng::seed_from_u64(3);
        let g = random(&[6, 4], &mut rng).t().unwrap();
        let u = random(&[4, 6], &mut rng);
        let diff = (silu_mul(&g, &u).unwrap() - silu_mul_reference(&g, &u).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(diff < 1e-5);
        assert!(silu_mul(&random(&[2, 3], &mut rng), &random(&[3, 2], &mut rng)).is_err());
    }
}
