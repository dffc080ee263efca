//! `intent_matching = "linear"`: a softmax regression over the embeddings,
//! trained with candle-nn at start on the intents' examples (a fraction of
//! a second for a few hundred examples), then run as plain dot products.
//!
//! Where a centroid gives every dimension of the embedding the same weight,
//! the head learns which directions tell this set of intents apart; on
//! classify/eval it is 2–3 points more accurate than the centroids with
//! e5-small. Training starts from zeros with full-batch gradient descent on
//! a convex loss, so the same examples always give the same head.

use crate::embedding::Best;
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{loss, Optimizer, SGD};

/// Logits are the cosine-like scores `w·x` times this: unit embeddings give
/// scores in a narrow range, which a softmax would flatten. Accuracy on
/// classify/eval is flat from 8 to 15.
const TEMPERATURE: f64 = 10.0;
/// Weight decay, so examples that are easy to separate do not push the
/// weights (and the probabilities) to extremes.
const L2: f64 = 1e-3;
const LEARNING_RATE: f64 = 0.5;
/// Full-batch steps; the loss has levelled off well before this.
const STEPS: usize = 800;

/// Per-label weights and bias.
pub struct LinearHead {
    /// `weights[label]`: the row for one label, scaled by the temperature.
    weights: Vec<Vec<f32>>,
    bias: Vec<f32>,
}

impl LinearHead {
    /// Trains on `groups[label]`, the vectors of each label.
    pub fn train(groups: &[Vec<Vec<f32>>]) -> Result<LinearHead, candle_core::Error> {
        let labels = groups.len();
        let dimension = groups.iter().flatten().map(Vec::len).next().unwrap_or(0);
        let (inputs, targets): (Vec<&Vec<f32>>, Vec<u32>) = groups
            .iter()
            .enumerate()
            .flat_map(|(label, group)| group.iter().map(move |vector| (vector, label as u32)))
            .unzip();
        let device = Device::Cpu;
        let count = inputs.len();
        let inputs = Tensor::from_vec(
            inputs.into_iter().flatten().copied().collect::<Vec<f32>>(),
            (count, dimension),
            &device,
        )?;
        let targets = Tensor::from_vec(targets, count, &device)?;
        let weights = Var::zeros((dimension, labels), DType::F32, &device)?;
        let bias = Var::zeros(labels, DType::F32, &device)?;
        let mut optimizer = SGD::new(vec![weights.clone(), bias.clone()], LEARNING_RATE)?;
        for _ in 0..STEPS {
            let logits = (inputs.matmul(weights.as_tensor())? * TEMPERATURE)?
                .broadcast_add(bias.as_tensor())?;
            let decay = (weights.as_tensor().sqr()?.sum_all()? * (L2 / 2.0))?;
            optimizer.backward_step(&(loss::cross_entropy(&logits, &targets)? + decay)?)?;
        }
        let scaled = (weights.as_tensor() * TEMPERATURE)?.t()?;
        Ok(LinearHead {
            weights: scaled.to_vec2()?,
            bias: bias.as_tensor().to_vec1()?,
        })
    }

    /// The most probable label, its probability, and how much more probable
    /// it is than the next.
    pub fn best(&self, query: &[f32]) -> Option<Best> {
        let logits: Vec<f32> = self
            .weights
            .iter()
            .zip(&self.bias)
            .map(|(row, bias)| row.iter().zip(query).map(|(w, x)| w * x).sum::<f32>() + bias)
            .collect();
        let top = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let exp: Vec<f32> = logits.iter().map(|logit| (logit - top).exp()).collect();
        let total: f32 = exp.iter().sum();
        let mut ranked: Vec<(usize, f32)> = exp.iter().map(|e| e / total).enumerate().collect();
        ranked.sort_by(|a, b| b.1.total_cmp(&a.1));
        let (label, score) = *ranked.first()?;
        Some(Best {
            label,
            score,
            margin: score - ranked.get(1).map_or(0.0, |next| next.1),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unit(x: f32, y: f32) -> Vec<f32> {
        let norm = (x * x + y * y).sqrt();
        vec![x / norm, y / norm]
    }

    #[test]
    fn learns_the_boundary_the_examples_draw() {
        // Two labels whose examples lie close together, about 45° apart.
        let east = vec![unit(1.0, 0.9), unit(1.0, 0.8), unit(1.0, 0.7)];
        let north = vec![unit(0.6, 1.0), unit(0.5, 1.0), unit(0.4, 1.0)];
        let head = LinearHead::train(&[east, north]).unwrap();
        let best = |x, y| head.best(&unit(x, y)).unwrap();
        assert_eq!(best(1.0, 0.8).label, 0);
        assert_eq!(best(0.5, 1.0).label, 1);
        assert_eq!(best(1.0, 0.0).label, 0);
        assert_eq!(best(0.0, 1.0).label, 1);
        let sure = best(1.0, 0.0);
        assert!(sure.score > 0.5 && sure.score <= 1.0, "{sure:?}");
        // Probabilities: the margin over the only other label is p - (1 - p).
        assert!(
            (sure.margin - (2.0 * sure.score - 1.0)).abs() < 1e-5,
            "{sure:?}"
        );
        // Near the boundary it is unsure.
        assert!(best(0.8, 1.0).score < sure.score);
    }

    #[test]
    fn the_same_examples_give_the_same_head() {
        let groups = [
            vec![unit(1.0, 0.2)],
            vec![unit(0.1, 1.0)],
            vec![unit(-1.0, 0.3)],
        ];
        let one = LinearHead::train(&groups).unwrap();
        let two = LinearHead::train(&groups).unwrap();
        assert_eq!(one.weights, two.weights);
        assert_eq!(one.bias, two.bias);
        assert_eq!(one.best(&unit(-1.0, 0.0)).unwrap().label, 2);
    }
}
