//! Precise BatchNorm statistics (fvcore's `update_bn_stats`; Wu & Johnson, "Rethinking 'Batch'
//! in BatchNorm", 2021).
//!
//! Training leaves in each BatchNorm a momentum average of the batch statistics of the last few
//! iterations, taken while the weights were still moving (and with `--ema-decay`, an average of
//! those averages next to averaged weights). [`precise_bn`] replaces them by the plain mean of
//! the batch statistics of the final weights themselves over a set of images.

use burn::module::Module;
use burn::tensor::{Device, Tensor};
use emo_weights::{StateDict, Tensor as Stored};

use crate::DenseError;
use crate::data::batch_size_padded;
use crate::model::DenseModel;
use crate::predict::batch_tensor_padded;

/// Each BatchNorm's (running mean, running variance), in state-dict key order.
type Stats = Vec<(Vec<f32>, Vec<f32>)>;

/// `model`'s weights (on any device) with the running statistics of every BatchNorm replaced by
/// the mean of its batch statistics over `images` (HWC RGB at `hw`), taken `shard` images at a
/// time (the per-replica batch the model was trained with) in training-mode forward passes on
/// the autodiff `device`:
/// no augmentation, drop path off, no gradient step; images beyond a whole number of shards are
/// not used. The mean is over shards, as fvcore's (the variance: the mean of the shards' own).
///
/// Each BatchNorm updates `running = (1 - m) * running + m * batch`; passes from zeroed
/// statistics give `m * batch`, and the momentum `m` of each layer is read off one pass from
/// statistics of one.
pub fn precise_bn(
    model: &DenseModel,
    images: &[&[u8]],
    hw: (usize, usize),
    shard: usize,
    device: &Device,
) -> Result<StateDict, DenseError> {
    precise_bn_sized(model, images, &vec![hw; images.len()], 1, shard, device)
}

/// [`precise_bn`] on images of their own (H, W) `sizes` (a keep-ratio run's images at its test
/// scale): each shard zero-padded, after normalisation, to its largest image rounded up to a
/// multiple of `pad`, as a detector's training batches were (mmdet's `Pad(size_divisor=32)`
/// then the batch's largest). With `pad` 1 (segmentation, which trains on equal crops) the
/// images are taken in order of size (H, then W; stable), so that a shard holds images of one
/// size where there are enough of them and pads as little as it can; the images beyond whole
/// shards are then the largest.
pub fn precise_bn_sized(
    model: &DenseModel,
    images: &[&[u8]],
    sizes: &[(usize, usize)],
    pad: usize,
    shard: usize,
    device: &Device,
) -> Result<StateDict, DenseError> {
    assert_eq!(images.len(), sizes.len(), "one size per image");
    if shard == 0 || images.len() < shard {
        return Err(DenseError::Data(format!("precise BN needs at least {shard} images, got {}", images.len())));
    }
    if !device.is_autodiff() {
        return Err(DenseError::Data("precise BN runs BatchNorm in training mode: an autodiff device".into()));
    }
    let mut cfg = model.cfg.clone();
    cfg.backbone.drop_path = 0.0;
    let base = model.state_dict();
    let layers: Vec<String> =
        base.tensors.keys().filter_map(|k| k.strip_suffix(".running_mean")).map(String::from).collect();
    let filled = |v: f32| {
        let mut sd = base.clone();
        for l in &layers {
            for s in ["running_mean", "running_var"] {
                let k = format!("{l}.{s}");
                let shape = sd.get(&k).expect("listed").shape.clone();
                let n = shape.iter().product();
                sd.insert(k, Stored::f32(shape, vec![v; n]));
            }
        }
        sd
    };
    // One training-mode pass from `sd`: the running statistics it leaves.
    let pass = |sd: &StateDict, x: Tensor<4>| -> Result<Stats, DenseError> {
        // No gradient tracking (an autodiff graph never consumed by a backward pass is not
        // freed), the BatchNorms still in training mode.
        let m = DenseModel::from_state_dict(&cfg, sd, device)?.no_grad();
        m.forward(x, true)?;
        let out = m.state_dict();
        let get = |k: String| out.get(&k).and_then(|t| t.as_f32()).map(<[f32]>::to_vec).expect("listed");
        Ok(layers.iter().map(|l| (get(format!("{l}.running_mean")), get(format!("{l}.running_var")))).collect())
    };
    let zero = filled(0.0);
    let mut order: Vec<usize> = (0..images.len()).collect();
    if pad <= 1 {
        order.sort_by_key(|&i| sizes[i]);
    }
    let batch = |i: usize| {
        let idx = &order[i * shard..(i + 1) * shard];
        let (imgs, sz): (Vec<&[u8]>, Vec<(usize, usize)>) = idx.iter().map(|&j| (images[j], sizes[j])).unzip();
        batch_tensor_padded(&imgs, &sz, batch_size_padded(&sz, pad), device)
    };
    let shards: Vec<usize> = (0..images.len() / shard).collect();
    let x0 = batch(0);
    let from_zero = pass(&zero, x0.clone())?;
    let from_one = pass(&filled(1.0), x0)?;
    // m = 1 - (from one - from zero), per channel.
    let momentum: Vec<Vec<f32>> = from_zero
        .iter()
        .zip(&from_one)
        .map(|((z, _), (o, _))| z.iter().zip(o).map(|(z, o)| 1.0 - (o - z)).collect())
        .collect();
    // Sums of `running / m` over the shards, the shards split over the cores.
    type Sums = Vec<(Vec<f64>, Vec<f64>)>;
    let add = |sums: &mut Sums, stats: &Stats| {
        for (((mean, var), (sm, sv)), mom) in stats.iter().zip(sums.iter_mut()).zip(&momentum) {
            for c in 0..mean.len() {
                if mom[c] > 1e-6 {
                    sm[c] += (mean[c] / mom[c]) as f64;
                    sv[c] += (var[c] / mom[c]) as f64;
                }
            }
        }
    };
    let empty: Sums = from_zero.iter().map(|(m, v)| (vec![0.0; m.len()], vec![0.0; v.len()])).collect();
    let mut sums = empty.clone();
    add(&mut sums, &from_zero);
    let parts = emo_train::parallel::map_parts(&shards[1..], emo_train::parallel::cores(), |part| {
        let mut sums = empty.clone();
        for &s in part {
            add(&mut sums, &pass(&zero, batch(s))?);
        }
        Ok::<_, DenseError>(sums)
    });
    for part in parts {
        for ((sm, sv), (pm, pv)) in sums.iter_mut().zip(part?) {
            sm.iter_mut().zip(pm).for_each(|(a, b)| *a += b);
            sv.iter_mut().zip(pv).for_each(|(a, b)| *a += b);
        }
    }
    let mut sd = base;
    let n = shards.len() as f64;
    for ((l, (sm, sv)), mom) in layers.iter().zip(sums).zip(&momentum) {
        for (s, v) in [("running_mean", sm), ("running_var", sv)] {
            let k = format!("{l}.{s}");
            let old = sd.get(&k).and_then(|t| t.as_f32()).map(<[f32]>::to_vec).expect("listed");
            // A layer the passes do not reach (m = 0) keeps its statistics.
            let new = v.iter().zip(old).zip(mom).map(|((x, o), &m)| if m > 1e-6 { (x / n) as f32 } else { o });
            let shape = sd.get(&k).expect("listed").shape.clone();
            sd.insert(k, Stored::f32(shape, new.collect()));
        }
    }
    Ok(sd)
}
