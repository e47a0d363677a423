//! Sampling by bytes (`--sample-rate BYTES`), userspace half: the tables the
//! eBPF side draws from and weighs with (`tracer-ebpf/src/sample.rs` says
//! how sampling works), and the same weights in floating point for the
//! per-block scans (ages, `--min-age`).
//!
//! An allocation of `size` bytes is sampled with probability
//! p = 1 - exp(-size / rate) and then stands for 1/p blocks and size/p
//! bytes: unbiased estimates, reported as such.

use tracer_common::{SAMPLE_DRAW_SLOTS, SAMPLE_WEIGHT_SLOTS, SAMPLE_WEIGHT_STEPS};

/// The largest rate: keeps the kernel's fixed-point products in 64 bits.
pub const MAX_RATE: u64 = 1 << 31;

/// x / (1 - exp(-x)), the byte weight per rate of a block of x rates.
fn f(x: f64) -> f64 {
    if x < 1e-9 {
        1.0 + x / 2.0
    } else {
        x / -(-x).exp_m1()
    }
}

/// Probability that a block of `size` bytes is sampled.
pub fn probability(size: u64, rate: u64) -> f64 {
    -(-(size as f64) / rate as f64).exp_m1()
}

/// (bytes, blocks) a sampled block of `size` bytes stands for.
pub fn weights(size: u64, rate: u64) -> (f64, f64) {
    if size == 0 {
        return (0.0, 1.0);
    }
    let p = probability(size, rate);
    (size as f64 / p, 1.0 / p)
}

/// The (bytes, blocks) the programs counted for a sampled block
/// (`tracer_common::sampled_weights` over `weight_table`), so
/// userspace can take exactly that back out when it drops the block.
/// `key` is the block's timestamp; rate 0 is exact mode.
pub fn kernel_weights(size: u64, key: u64, rate: u64) -> (u64, u64) {
    tracer_common::sampled_weights(size, key, rate, |i| Some(table_weight(rate, i)))
}

/// `SAMPLE_DRAWS`: quantiles of the exponential distribution of mean
/// `rate` at the ends of its equal-probability slices; the last slice (the
/// unbounded tail) ends one rate after it starts, its mean length.
pub fn draw_table(rate: u64) -> Vec<u64> {
    let n = SAMPLE_DRAW_SLOTS as f64;
    let mut table: Vec<u64> = (0..SAMPLE_DRAW_SLOTS)
        .map(|k| {
            let q = k as f64 / n;
            ((-(-q).ln_1p()) * rate as f64).round() as u64
        })
        .collect();
    table.push(table[table.len() - 1] + rate);
    table
}

/// Slot i of `SAMPLE_WEIGHTS`: rate * f(i / STEPS).
fn table_weight(rate: u64, i: u64) -> u64 {
    (rate as f64 * f(i as f64 / SAMPLE_WEIGHT_STEPS as f64)).round() as u64
}

/// `SAMPLE_WEIGHTS`: slot i is rate * f(i / STEPS).
pub fn weight_table(rate: u64) -> Vec<u64> {
    (0..SAMPLE_WEIGHT_SLOTS as u64)
        .map(|i| table_weight(rate, i))
        .collect()
}

/// "512k", "1M", "4096": bytes, for `--sample-rate`.
pub fn parse_rate(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let (number, unit) = text.split_at(
        text.find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len()),
    );
    let n: u64 = number
        .parse()
        .map_err(|_| format!("'{text}' is not a size in bytes (examples: 4096, 512k, 1M)"))?;
    let factor = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        other => {
            return Err(format!(
                "unknown unit '{other}' in '{text}' (use k, M or G)"
            ))
        }
    };
    let rate = n.saturating_mul(factor);
    if rate == 0 || rate > MAX_RATE {
        return Err(format!("'{text}': the sample rate must be 1 byte to 2 GiB"));
    }
    Ok(rate)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The eBPF side's arithmetic (sample.rs), in Rust, to test it here.
    struct Kernel {
        rate: u64,
        draws: Vec<u64>,
        weights: Vec<u64>,
        countdown: Option<u64>,
        rng: u64,
    }

    impl Kernel {
        fn new(rate: u64) -> Self {
            Kernel {
                rate,
                draws: draw_table(rate),
                weights: weight_table(rate),
                countdown: None,
                rng: 0x1234_5678_9abc_def1,
            }
        }

        fn random(&mut self) -> u32 {
            // xorshift64*
            self.rng ^= self.rng >> 12;
            self.rng ^= self.rng << 25;
            self.rng ^= self.rng >> 27;
            (self.rng.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 32) as u32
        }

        fn draw(&mut self) -> u64 {
            let random = self.random();
            let slot = ((random >> 16) % SAMPLE_DRAW_SLOTS) as usize;
            let (lo, hi) = (self.draws[slot], self.draws[slot + 1]);
            (lo + ((hi.saturating_sub(lo) * (random & 0xffff) as u64) >> 16)).max(1)
        }

        fn skip(&mut self, size: u64) -> bool {
            let left = match self.countdown {
                Some(left) => left,
                None => self.draw(),
            };
            if left > size {
                self.countdown = Some(left - size);
                return true;
            }
            self.countdown = Some(self.draw());
            false
        }

        fn weights(&self, size: u64, key: u64) -> (u64, u64) {
            let rate = self.rate;
            let steps = SAMPLE_WEIGHT_STEPS as u64;
            let last = (SAMPLE_WEIGHT_SLOTS - 1) as u64;
            if size == 0 || size >= rate * last / steps {
                return (size, 1);
            }
            let scaled = size * steps;
            let i = scaled / rate;
            let frac = scaled - i * rate;
            let (w0, w1) = (self.weights[i as usize], self.weights[i as usize + 1]);
            let bytes = (w0 + w1.saturating_sub(w0) * frac / rate).max(size);
            let blocks_fp = (bytes << 16) / size;
            let coin = key.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 48;
            (
                bytes,
                (blocks_fp >> 16) + ((coin < (blocks_fp & 0xffff)) as u64),
            )
        }
    }

    #[test]
    fn userspace_retires_what_the_kernel_counted() {
        assert_eq!(kernel_weights(100, 7, 0), (100, 1));
        let rate = 65536;
        let k = Kernel::new(rate);
        for (size, key) in [(1u64, 1u64), (100, 2), (4096, 3), (65536, 4), (1 << 30, 5)] {
            let (bytes, blocks) = kernel_weights(size, key, rate);
            assert_eq!((bytes, blocks), k.weights(size, key), "size {size}");
            assert!(bytes >= size && blocks >= 1);
        }
        // A 100-byte block sampled at 64 KiB stands for ~655 blocks, not 1.
        assert!(kernel_weights(100, 9, rate).1 > 600);
    }

    #[test]
    fn kernel_weights_match_the_formula() {
        let rate = 65536;
        let k = Kernel::new(rate);
        for size in [
            1u64, 16, 100, 1000, 4096, 65536, 100_000, 500_000, 2_000_000,
        ] {
            let (bytes, _) = k.weights(size, 0);
            let (exact, _) = weights(size, rate);
            let error = (bytes as f64 - exact).abs() / exact;
            assert!(error < 1e-3, "size {size}: {bytes} vs {exact}");
        }
    }

    #[test]
    fn the_draw_table_has_the_right_mean() {
        let rate = 1 << 20;
        let table = draw_table(rate);
        assert_eq!(table.len(), SAMPLE_DRAW_SLOTS as usize + 1);
        // Mean of a uniform point in a uniformly chosen slice.
        let mean = table
            .windows(2)
            .map(|w| (w[0] + w[1]) as f64 / 2.0)
            .sum::<f64>()
            / SAMPLE_DRAW_SLOTS as f64;
        assert!((mean / rate as f64 - 1.0).abs() < 0.01, "{mean}");
        assert!(table.windows(2).all(|w| w[0] <= w[1]));
    }

    /// Many blocks of a few sizes, sampled the kernel's way: the weighted
    /// sums estimate the true totals.
    #[test]
    fn sampled_estimates_are_close_to_exact() {
        let rate = 4096;
        let mut k = Kernel::new(rate);
        let sizes = [24u64, 100, 700, 3000, 20_000];
        let mut truth = [(0u64, 0u64); 5];
        let mut estimate = [(0u64, 0u64); 5];
        let mut key = 1u64;
        for n in 0..4_000_000u64 {
            let which = (n * 7919 % 5) as usize;
            let size = sizes[which];
            truth[which].0 += size;
            truth[which].1 += 1;
            if !k.skip(size) {
                key += 1;
                let (bytes, blocks) = k.weights(size, key);
                estimate[which].0 += bytes;
                estimate[which].1 += blocks;
            }
        }
        for i in 0..5 {
            let bytes_error = estimate[i].0 as f64 / truth[i].0 as f64 - 1.0;
            let blocks_error = estimate[i].1 as f64 / truth[i].1 as f64 - 1.0;
            eprintln!(
                "size {}: bytes {bytes_error:+.4} blocks {blocks_error:+.4}",
                sizes[i]
            );
            assert!(
                bytes_error.abs() < 0.05,
                "size {}: bytes off by {bytes_error}",
                sizes[i]
            );
            assert!(
                blocks_error.abs() < 0.05,
                "size {}: blocks off by {blocks_error}",
                sizes[i]
            );
        }
    }

    #[test]
    fn rates_parse() {
        assert_eq!(parse_rate("4096"), Ok(4096));
        assert_eq!(parse_rate("512k"), Ok(512 << 10));
        assert_eq!(parse_rate("1M"), Ok(1 << 20));
        for bad in ["", "0", "k", "3x", "4G"] {
            assert!(parse_rate(bad).is_err(), "{bad}");
        }
    }
}
