//! A BERT encoder's forward pass for inference on the CPU, on the weights
//! candle loads from `model.safetensors` (the names candle-transformers'
//! `BertModel` reads, which the tests hold this pass to).
//!
//! Why not `BertModel` itself: on chat messages it spends more time outside
//! its matrix products than in them — a single-threaded `erf` GELU as long
//! as the largest product, a broadcast add for every bias, a pass of its own
//! for each mask, scale and transpose, and padding. Here the sentences of a
//! pass are packed one after another with no padding, so every product is
//! one `[tokens, hidden]` matrix and attention looks only within a sentence;
//! bias and activation, residual and layer norm are each one multi-threaded
//! sweep over memory; query, key and value are one product.

use crate::model::{dot, unit_sum};
use candle_core::{CpuStorage, CustomOp1, Device, InplaceOp2, InplaceOp3, Layout, Shape, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{Config, HiddenAct, PositionEmbeddingType};
use rayon::prelude::*;

/// Tokens per forward pass: sentences are packed until the next would
/// pass this (a longer one goes alone). Bounds the activations' memory
/// (`tokens × intermediate × 4` bytes) and keeps them in cache.
pub(crate) const TOKENS_PER_PASS: usize = 1024;

pub struct Bert {
    word: Tensor,
    /// Position embeddings with the token-type 0 embedding already added:
    /// texts are single segments.
    position: Tensor,
    norm: Norm,
    layers: Vec<Layer>,
    heads: usize,
    act: HiddenAct,
    device: Device,
}

/// A layer norm's weight and bias as one `[2, hidden]` tensor.
struct Norm {
    weight_bias: Tensor,
    eps: f64,
}

struct Linear {
    weight: Tensor,
    bias: Tensor,
}

struct Layer {
    /// Query, key and value as one `[3 × hidden, hidden]` product.
    qkv: Linear,
    attention_out: Linear,
    attention_norm: Norm,
    up: Linear,
    down: Linear,
    norm: Norm,
}

impl Bert {
    /// The weights under `vb`, at the top level or under `{model_type}.`,
    /// as `BertModel::load` looks for them.
    pub fn load(vb: VarBuilder, config: &Config) -> candle_core::Result<Self> {
        match Bert::load_at(&vb, config) {
            Ok(bert) => Ok(bert),
            Err(error) => match &config.model_type {
                Some(model_type) => Bert::load_at(&vb.pp(model_type), config).map_err(|_| error),
                None => Err(error),
            },
        }
    }

    fn load_at(vb: &VarBuilder, config: &Config) -> candle_core::Result<Self> {
        if config.position_embedding_type != PositionEmbeddingType::Absolute {
            candle_core::bail!("only absolute position embeddings are supported");
        }
        let hidden = config.hidden_size;
        let norm = |vb: VarBuilder| -> candle_core::Result<Norm> {
            let weight = vb.get(hidden, "weight")?;
            let bias = vb.get(hidden, "bias")?;
            Ok(Norm {
                weight_bias: Tensor::stack(&[weight, bias], 0)?,
                eps: config.layer_norm_eps,
            })
        };
        let linear = |vb: VarBuilder, inputs: usize, outputs: usize| {
            Ok::<_, candle_core::Error>(Linear {
                weight: vb.get((outputs, inputs), "weight")?,
                bias: vb.get(outputs, "bias")?,
            })
        };
        let embeddings = vb.pp("embeddings");
        let word = embeddings.get((config.vocab_size, hidden), "word_embeddings.weight")?;
        let position = embeddings.get(
            (config.max_position_embeddings, hidden),
            "position_embeddings.weight",
        )?;
        let token_type = embeddings
            .get(
                (config.type_vocab_size, hidden),
                "token_type_embeddings.weight",
            )?
            .get(0)?;
        let layers = (0..config.num_hidden_layers)
            .map(|i| {
                let vb = vb.pp(format!("encoder.layer.{i}"));
                let attention = vb.pp("attention");
                let qkv = ["query", "key", "value"]
                    .map(|name| linear(attention.pp("self").pp(name), hidden, hidden));
                let [query, key, value] = qkv;
                let (query, key, value) = (query?, key?, value?);
                Ok(Layer {
                    qkv: Linear {
                        weight: Tensor::cat(&[query.weight, key.weight, value.weight], 0)?,
                        bias: Tensor::cat(&[query.bias, key.bias, value.bias], 0)?,
                    },
                    attention_out: linear(attention.pp("output.dense"), hidden, hidden)?,
                    attention_norm: norm(attention.pp("output.LayerNorm"))?,
                    up: linear(
                        vb.pp("intermediate.dense"),
                        hidden,
                        config.intermediate_size,
                    )?,
                    down: linear(vb.pp("output.dense"), config.intermediate_size, hidden)?,
                    norm: norm(vb.pp("output.LayerNorm"))?,
                })
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Bert {
            word,
            position: position.broadcast_add(&token_type)?,
            norm: norm(embeddings.pp("LayerNorm"))?,
            layers,
            heads: config.num_attention_heads,
            act: config.hidden_act,
            device: vb.device().clone(),
        })
    }

    /// Each token id sequence's (special tokens included) mean-pooled,
    /// unit-length embedding, in order.
    pub fn sentence_embeddings(&self, ids: &[&[u32]]) -> candle_core::Result<Vec<Vec<f32>>> {
        let mut embeddings = Vec::with_capacity(ids.len());
        let mut start = 0;
        while start < ids.len() {
            let mut end = start + 1;
            let mut tokens = ids[start].len();
            while end < ids.len() && tokens + ids[end].len() <= TOKENS_PER_PASS {
                tokens += ids[end].len();
                end += 1;
            }
            embeddings.extend(self.pass(&ids[start..end])?);
            start = end;
        }
        Ok(embeddings)
    }

    /// One forward pass over `ids` packed together.
    fn pass(&self, ids: &[&[u32]]) -> candle_core::Result<Vec<Vec<f32>>> {
        let lengths: Vec<usize> = ids.iter().map(|one| one.len().max(1)).collect();
        // An empty sequence would have nothing to pool: it reads one id 0.
        let flat: Vec<u32> = ids
            .iter()
            .flat_map(|one| if one.is_empty() { &[0][..] } else { one })
            .copied()
            .collect();
        let positions: Vec<u32> = lengths.iter().flat_map(|&n| 0..n as u32).collect();
        let tokens = flat.len();
        let word = self
            .word
            .index_select(&Tensor::from_vec(flat, tokens, &self.device)?, 0)?;
        let position = self
            .position
            .index_select(&Tensor::from_vec(positions, tokens, &self.device)?, 0)?;
        let mut hidden = self.norm.add_norm(word, &position)?;
        for layer in &self.layers {
            let qkv = layer.qkv.forward(&hidden, None)?;
            let context = qkv.apply_op1_no_bwd(&Attention {
                lengths: &lengths,
                heads: self.heads,
            })?;
            let attended = layer.attention_out.forward(&context, None)?;
            hidden = layer.attention_norm.add_norm(attended, &hidden)?;
            let up = layer.up.forward(&hidden, Some(self.act))?;
            let down = layer.down.forward(&up, None)?;
            hidden = layer.norm.add_norm(down, &hidden)?;
        }
        let hidden = hidden.flatten_all()?.to_vec1::<f32>()?;
        let width = hidden.len() / tokens;
        let mut rows = hidden.chunks_exact(width);
        Ok(lengths
            .iter()
            .map(|&n| unit_sum(rows.by_ref().take(n), width))
            .collect())
    }
}

impl Linear {
    /// `x · weightᵀ + bias`, then `act` when given.
    fn forward(&self, x: &Tensor, act: Option<HiddenAct>) -> candle_core::Result<Tensor> {
        let y = x.matmul(&self.weight.t()?)?;
        y.inplace_op2(&self.bias, &BiasAct(act))?;
        Ok(y)
    }
}

impl Norm {
    /// `layer_norm(x + residual)`, in `x`'s storage.
    fn add_norm(&self, x: Tensor, residual: &Tensor) -> candle_core::Result<Tensor> {
        x.inplace_op3(residual, &self.weight_bias, &AddNorm(self.eps as f32))?;
        Ok(x)
    }
}

/// The contiguous f32 data of a tensor's storage.
fn data<'a>(storage: &'a CpuStorage, layout: &Layout) -> candle_core::Result<&'a [f32]> {
    match (storage, layout.contiguous_offsets()) {
        (CpuStorage::F32(data), Some((start, end))) => Ok(&data[start..end]),
        _ => candle_core::bail!("bert: contiguous f32 expected"),
    }
}

fn data_mut<'a>(
    storage: &'a mut CpuStorage,
    layout: &Layout,
) -> candle_core::Result<&'a mut [f32]> {
    match (storage, layout.contiguous_offsets()) {
        (CpuStorage::F32(data), Some((start, end))) => Ok(&mut data[start..end]),
        _ => candle_core::bail!("bert: contiguous f32 expected"),
    }
}

/// Adds a bias to every row, then applies the activation if any.
struct BiasAct(Option<HiddenAct>);

impl InplaceOp2 for BiasAct {
    fn name(&self) -> &'static str {
        "bias-act"
    }

    fn cpu_fwd(
        &self,
        x: &mut CpuStorage,
        x_layout: &Layout,
        bias: &CpuStorage,
        bias_layout: &Layout,
    ) -> candle_core::Result<()> {
        let bias = data(bias, bias_layout)?;
        let act = self.0;
        data_mut(x, x_layout)?
            .par_chunks_mut(bias.len())
            .for_each(|row| {
                for (x, b) in row.iter_mut().zip(bias) {
                    *x += b;
                }
                match act {
                    None => {}
                    Some(HiddenAct::Gelu) => row.iter_mut().for_each(|x| *x = gelu(*x)),
                    Some(HiddenAct::GeluApproximate) => {
                        row.iter_mut().for_each(|x| *x = gelu_tanh(*x))
                    }
                    Some(HiddenAct::Relu) => row.iter_mut().for_each(|x| *x = x.max(0.0)),
                }
            });
        Ok(())
    }
}

/// `layer_norm(x + residual)` per row, into `x`; the third operand is the
/// norm's `[weight; bias]`.
struct AddNorm(f32);

impl InplaceOp3 for AddNorm {
    fn name(&self) -> &'static str {
        "add-norm"
    }

    fn cpu_fwd(
        &self,
        x: &mut CpuStorage,
        x_layout: &Layout,
        residual: &CpuStorage,
        residual_layout: &Layout,
        weight_bias: &CpuStorage,
        weight_bias_layout: &Layout,
    ) -> candle_core::Result<()> {
        let residual = data(residual, residual_layout)?;
        let weight_bias = data(weight_bias, weight_bias_layout)?;
        let (weight, bias) = weight_bias.split_at(weight_bias.len() / 2);
        let width = weight.len();
        let eps = self.0;
        data_mut(x, x_layout)?
            .par_chunks_mut(width)
            .zip(residual.par_chunks(width))
            .for_each(|(row, residual)| {
                for (x, r) in row.iter_mut().zip(residual) {
                    *x += r;
                }
                let mean = row.iter().sum::<f32>() / width as f32;
                let variance =
                    row.iter().map(|x| (x - mean) * (x - mean)).sum::<f32>() / width as f32;
                let scale = 1.0 / (variance + eps).sqrt();
                for ((x, w), b) in row.iter_mut().zip(weight).zip(bias) {
                    *x = (*x - mean) * scale * w + b;
                }
            });
        Ok(())
    }
}

/// Self-attention within each sentence of a packed pass: `[tokens, 3 ×
/// hidden]` query, key and value in, `[tokens, hidden]` context out.
struct Attention<'a> {
    lengths: &'a [usize],
    heads: usize,
}

impl CustomOp1 for Attention<'_> {
    fn name(&self) -> &'static str {
        "packed-attention"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let qkv = data(storage, layout)?;
        let (tokens, width) = layout.shape().dims2()?;
        let hidden = width / 3;
        let size = hidden / self.heads;
        let scale = 1.0 / (size as f32).sqrt();
        let mut context = vec![0f32; tokens * hidden];
        // Each sentence's rows of the output, to fill in parallel.
        let mut sentences = Vec::with_capacity(self.lengths.len());
        let (mut rest, mut start) = (context.as_mut_slice(), 0);
        for &n in self.lengths {
            let (rows, tail) = rest.split_at_mut(n * hidden);
            sentences.push((start, n, rows));
            rest = tail;
            start += n;
        }
        sentences.into_par_iter().for_each(|(start, n, out)| {
            let row = |i: usize| &qkv[(start + i) * width..(start + i + 1) * width];
            let mut weights = vec![0f32; n];
            for head in 0..self.heads {
                let at = head * size;
                for i in 0..n {
                    let query = &row(i)[at..at + size];
                    for (j, weight) in weights.iter_mut().enumerate() {
                        let key = &row(j)[hidden + at..hidden + at + size];
                        *weight = dot(query, key) * scale;
                    }
                    let most = weights.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let mut total = 0.0;
                    for weight in weights.iter_mut() {
                        *weight = (*weight - most).exp();
                        total += *weight;
                    }
                    let out = &mut out[i * hidden + at..i * hidden + at + size];
                    for (j, weight) in weights.iter().enumerate() {
                        let value = &row(j)[2 * hidden + at..2 * hidden + at + size];
                        let weight = weight / total;
                        for (o, v) in out.iter_mut().zip(value) {
                            *o += weight * v;
                        }
                    }
                }
            }
        });
        Ok((CpuStorage::F32(context), Shape::from((tokens, hidden))))
    }
}

/// GELU as BERT defines it, `x · Φ(x)`, with `erf` to within 1.5e-7
/// (Abramowitz and Stegun 7.1.26; 5e-7 in f32).
fn gelu(x: f32) -> f32 {
    0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2))
}

fn erf(x: f32) -> f32 {
    let t = 1.0 / (1.0 + 0.327_591_1 * x.abs());
    let poly = t
        * (0.254_829_6
            + t * (-0.284_496_72 + t * (1.421_413_8 + t * (-1.453_152 + t * 1.061_405_4))));
    (1.0 - poly * (-x * x).exp()).copysign(x)
}

/// GELU's tanh approximation (`hidden_act = "gelu_new"`).
fn gelu_tanh(x: f32) -> f32 {
    let inner = (2.0 / std::f32::consts::PI).sqrt() * (x + 0.044_715 * x * x * x);
    0.5 * x * (1.0 + inner.tanh())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use candle_core::DType;
    use candle_nn::VarMap;
    use candle_transformers::models::bert::BertModel;

    /// A two-layer BERT's dimensions over `vocabulary` tokens.
    pub(crate) fn tiny_config(vocabulary: usize) -> Config {
        Config {
            vocab_size: vocabulary,
            hidden_size: 8,
            num_hidden_layers: 2,
            num_attention_heads: 2,
            intermediate_size: 16,
            max_position_embeddings: 32,
            ..Config::default()
        }
    }

    /// Weights as `BertModel` initializes them (random products, unit
    /// layer norms) under the names it reads, and that model over them.
    pub(crate) fn tiny_weights(config: &Config) -> (VarMap, BertModel) {
        let weights = VarMap::new();
        let vb = VarBuilder::from_varmap(&weights, DType::F32, &Device::Cpu);
        let reference = BertModel::load(vb, config).unwrap();
        (weights, reference)
    }

    /// `hidden` `[batch, tokens, dim]` averaged over the tokens whose `mask`
    /// is 1, scaled to unit length: how a padded batch is pooled.
    fn mean_pool_normalized(hidden: &Tensor, mask: &Tensor) -> candle_core::Result<Tensor> {
        let mask = mask.to_dtype(hidden.dtype())?.unsqueeze(2)?;
        let summed = hidden.broadcast_mul(&mask)?.sum(1)?;
        let norm = summed.sqr()?.sum_keepdim(1)?.sqrt()?;
        summed.broadcast_div(&norm)
    }

    #[test]
    fn packed_passes_match_candle_transformers_bert_on_a_padded_batch() {
        let ids: [&[u32]; 4] = [
            &[2, 4, 5, 3],
            &[2, 6, 3],
            &[2, 7, 8, 9, 10, 11, 12, 3],
            &[9],
        ];
        let longest = 8;
        let mut flat = Vec::new();
        let mut mask = Vec::new();
        for one in ids {
            flat.extend(
                one.iter()
                    .copied()
                    .chain(std::iter::repeat_n(0, longest - one.len())),
            );
            mask.extend((0..longest).map(|i| u32::from(i < one.len())));
        }
        let flat = Tensor::from_vec(flat, (ids.len(), longest), &Device::Cpu).unwrap();
        let mask = Tensor::from_vec(mask, (ids.len(), longest), &Device::Cpu).unwrap();
        for act in [HiddenAct::Gelu, HiddenAct::GeluApproximate, HiddenAct::Relu] {
            let config = Config {
                hidden_act: act,
                ..tiny_config(16)
            };
            let (weights, reference) = tiny_weights(&config);
            // Every weight random, so the layer norms and biases count too.
            for var in weights.all_vars() {
                var.set(&var.randn_like(0.0, 0.5).unwrap()).unwrap();
            }
            let hidden = reference
                .forward(&flat, &flat.zeros_like().unwrap(), Some(&mask))
                .unwrap();
            let expected = mean_pool_normalized(&hidden, &mask)
                .unwrap()
                .to_vec2::<f32>()
                .unwrap();
            let vb = VarBuilder::from_varmap(&weights, DType::F32, &Device::Cpu);
            let bert = Bert::load(vb, &config).unwrap();
            let packed = bert.sentence_embeddings(&ids).unwrap();
            for (ours, theirs) in packed.iter().zip(&expected) {
                let apart = ours.iter().zip(theirs).map(|(a, b)| (a - b).abs());
                assert!(
                    apart.fold(0.0, f32::max) < 1e-5,
                    "{act:?}: {ours:?} vs {theirs:?}"
                );
            }
        }
    }

    #[test]
    fn erf_is_within_its_bound_of_libm() {
        for i in -4000..=4000 {
            let x = i as f32 / 1000.0;
            let exact = candle_core::cpu::erf::erf_f64(x as f64) as f32;
            assert!(
                (erf(x) - exact).abs() < 5e-7,
                "erf({x}) = {} vs {exact}",
                erf(x)
            );
        }
    }
}
