//! Multipack: cutting one epoch into steps of `world` bins of `batch_tokens` slots (SPEC §8).
//!
//! Every rank runs this on the same lengths and gets the same plan, so no communication is
//! needed to agree on who trains on what. Per step:
//!
//! ```text
//! window  = samples from `start` until their lengths sum to >= c*n (or the epoch ends)
//! m       = bisection over [1, window+1) for the largest prefix LPT fits in n bins of c
//!           (m = 1 is accepted untested; a bisection, not a search: LPT is not monotone)
//! bins    = LPT placement of the first m window samples
//! m < n   -> the epoch ends;  start += m;  start == end of epoch -> this last step is dropped
//! ```
//!
//! The tie rules (equal lengths: higher index first; heap: left child unless the right is
//! strictly lighter, swap only when strictly lighter) decide which rank gets which sample;
//! they are reproduced literally so that our plan equals the reference sampler's.

/// The steps of one epoch. Rows are row indices of the epoch (0 = its first sample).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EpochPlan {
    /// `steps[k][r]`: the rows rank `r` trains on at step `k`, in the order LPT assigned them
    /// (also their order in the packed buffer).
    pub steps: Vec<Vec<Vec<usize>>>,
    /// Capacity of one bin (the local batch) and number of bins (ranks).
    pub batch_tokens: usize,
    pub world: usize,
    /// Rows in the epoch.
    pub total_rows: usize,
    /// The emitted steps hold exactly rows `0..packed_rows`, each once.
    pub packed_rows: usize,
    /// Sum of the packed lengths of those rows.
    pub packed_tokens: usize,
}

impl EpochPlan {
    /// Fraction of the slots of the emitted steps that hold tokens rather than padding.
    pub fn efficiency(&self) -> f64 {
        let slots = self.steps.len() * self.world * self.batch_tokens;
        if slots == 0 {
            return 0.0;
        }
        self.packed_tokens as f64 / slots as f64
    }

    /// Rows of the tail that no step trains on (the partial or dropped last step).
    pub fn dropped_rows(&self) -> usize {
        self.total_rows - self.packed_rows
    }

    /// The rows rank `rank` trains on at step `step`, in assignment order.
    pub fn rows(&self, step: usize, rank: usize) -> &[usize] {
        &self.steps[step][rank]
    }
}

/// Plans one epoch. `lengths[i]` is row `i`'s packed length `inst_len + resp_len - 1`;
/// `batch_tokens` is the capacity `c` of one bin, `world` the number of bins `n`.
///
/// A sample longer than `batch_tokens` is still placed (as the untested `m = 1` of the
/// reference), overflowing its bin; callers check `batch_tokens >= longest sample` first.
pub fn plan_epoch(lengths: &[usize], batch_tokens: usize, world: usize) -> EpochPlan {
    assert!(batch_tokens >= 1 && world >= 1, "plan_epoch: batch_tokens and world must be positive");
    let (c, n) = (batch_tokens, world);
    let mut plan = EpochPlan { steps: Vec::new(), batch_tokens, world, total_rows: lengths.len(), packed_rows: 0, packed_tokens: 0 };
    let mut start = 0;
    while start < lengths.len() {
        // 1. The window: scan until the lengths reach c * n, keeping the sample that crossed.
        let mut end = start;
        let mut sum = 0;
        while end < lengths.len() && sum < c * n {
            sum += lengths[end];
            end += 1;
        }
        let window = &lengths[start..end];
        let order = lpt_order(window);

        // 2. Bisection for the largest prefix that fits, starting with m = 1 accepted.
        let (mut l, mut r) = (1, window.len() + 1);
        while r - l > 1 {
            let mid = (l + r) / 2;
            if lpt(window, &order, mid, n, Some(c)).is_some() {
                l = mid;
            } else {
                r = mid;
            }
        }
        // 3. Placement of the first l samples; m = 1 may not have been tested, so no capacity.
        let bins = lpt(window, &order, l, n, None).expect("placement without capacity always succeeds");

        // 4. Stop and drop-last rules.
        if l < n {
            break;
        }
        start += l;
        if start >= lengths.len() {
            break;
        }
        let offset = start - l;
        plan.steps.push(bins.into_iter().map(|bin| bin.into_iter().map(|i| offset + i).collect()).collect());
        plan.packed_rows = start;
        plan.packed_tokens += window[..l].iter().sum::<usize>();
    }
    plan
}

/// LPT order of a window: length descending, equal lengths by higher index first (a stable
/// ascending sort, reversed). The order of any prefix `0..m` is this order restricted to
/// indices `< m`, so one sort serves every probe of the bisection.
fn lpt_order(window: &[usize]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..window.len()).collect();
    order.sort_by_key(|&i| (std::cmp::Reverse(window[i]), std::cmp::Reverse(i)));
    order
}

/// Longest-processing-time placement of window samples `0..m` into `n` bins. Returns each
/// bin's samples in assignment order, or `None` as soon as a bin's load exceeds `capacity`.
///
/// The bins sit in a 1-indexed binary min-heap of loads; bin `r` starts at slot `r + 1`.
/// Each sample goes to the root's bin, then the root sifts down: take the left child, the
/// right one only if strictly lighter, swap only if that child is strictly lighter.
fn lpt(window: &[usize], order: &[usize], m: usize, n: usize, capacity: Option<usize>) -> Option<Vec<Vec<usize>>> {
    let mut load = vec![0usize; n + 1]; // [n+1] heap slot -> load (slot 0 unused)
    let mut bin_at: Vec<usize> = (0..=n).map(|slot| slot.wrapping_sub(1)).collect(); // [n+1] heap slot -> bin
    let mut bins = vec![Vec::new(); n];
    for &i in order.iter().filter(|&&i| i < m) {
        load[1] += window[i];
        if capacity.is_some_and(|c| load[1] > c) {
            return None;
        }
        bins[bin_at[1]].push(i);
        let mut k = 1;
        loop {
            let mut child = 2 * k;
            if child > n {
                break;
            }
            if child < n && load[child + 1] < load[child] {
                child += 1;
            }
            if load[child] >= load[k] {
                break;
            }
            load.swap(k, child);
            bin_at.swap(k, child);
            k = child;
        }
    }
    Some(bins)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    /// Worked by hand to pin the window, the bisection and the LPT tie between equal lengths.
    /// Heap states are written `[slot1, slot2]` as bin:load.
    #[test]
    fn golden_two_ranks() {
        // c = 10, n = 2: a window stops once its lengths reach 20.
        let lengths = [4, 6, 3, 3, 5, 2, 7, 1, 4, 4, 9, 2];
        let plan = plan_epoch(&lengths, 10, 2);
        // Step 0: window rows 0..5 (4+6+3+3+5 = 21), LPT order 1(6) 4(5) 0(4) 3(3) 2(3); l=1, r=6.
        //   mid 3 (rows 1,0,2): 6->b0 [b1:0,b0:6]; 4->b1; 3->b1=7 [b0:6,b1:7]. Fits, l=3.
        //   mid 4 (rows 1,0,3,2): as above, then row 2 (3) -> b0 = 9. Fits, l=4.
        //   mid 5 (rows 1,4,0,3,2): 6->b0 [b1:0,b0:6]; 5->b1; 4->b1=9 [b0:6,b1:9];
        //          3->b0=9, no swap (9 is not strictly lighter than 9); 3->b0=12 > 10. r=5.
        //   m = 4: b0 = [1, 2], b1 = [0, 3] (row 3 before row 2: equal lengths, higher row first).
        // Step 1: start 4, window rows 4..10 (5+2+7+1+4+4 = 23), order 6(7) 4(5) 9(4) 8(4) 5(2) 7(1).
        //   mid 4 (rows 6,4,5,7): 7->b0; 5->b1; 2->b1=7, stays root (7 vs 7); 1->b1=8. Fits.
        //   mid 5 (rows 6,4,8,5,7): 7->b0; 5->b1; 4->b1=9 [b0:7,b1:9]; 2->b0=9 stays root;
        //          1->b0=10 <= 10. Fits, l=5.
        //   mid 6 (rows 6,4,9,8,5,7): 7->b0; 5->b1; 4->b1=9 [b0:7,b1:9]; 4->b0=11 > 10. r=6.
        //   m = 5: b0 = [6, 5, 7], b1 = [4, 8].
        // Step 2: start 9, rows 9..12 (4+9+2 = 15, the epoch ends first): m = 3 >= 2 fits, but
        //   start reaches the end of the epoch, so this last step is dropped.
        assert_eq!(plan.steps, vec![vec![vec![1, 2], vec![0, 3]], vec![vec![6, 5, 7], vec![4, 8]]]);
        assert_eq!((plan.packed_rows, plan.dropped_rows()), (9, 3));
        assert_eq!(plan.packed_tokens, 35);
        assert!((plan.efficiency() - 35.0 / 40.0).abs() < 1e-12);
    }

    /// Three bins pin the sift-down: left child unless the right is strictly lighter, swap
    /// only when strictly lighter. Heap states are `[slot1, slot2, slot3]` as bin:load.
    #[test]
    fn golden_three_ranks() {
        // c = 10, n = 3: step 0's window is rows 0..7 (5+5+5+2+2+2+9 = 30). All 7 do not fit
        // (9, 5, 5, 5+... overflows); the bisection probes 4 (fits), 6 (fits), 7 (fails): m = 6.
        // LPT order of rows 0..6: 2(5) 1(5) 0(5) 5(2) 4(2) 3(2).
        //   row 2 -> b0=5: children b1:0, b2:0 equal -> left; swap    [b1:0, b0:5, b2:0]
        //   row 1 -> b1=5: right b2:0 strictly lighter; swap          [b2:0, b0:5, b1:5]
        //   row 0 -> b2=5: children 5, 5 -> left b0:5, not lighter    [b2:5, b0:5, b1:5]
        //   row 5 -> b2=7: left b0:5 (right not strictly lighter)     [b0:5, b2:7, b1:5]
        //   row 4 -> b0=7: right b1:5 strictly lighter; swap          [b1:5, b2:7, b0:7]
        //   row 3 -> b1=7: children 7, 7: left, not lighter; stop.
        // Rows 6..9 (9, 1, 1) then fill a step that reaches the end of the epoch: dropped.
        let plan = plan_epoch(&[5, 5, 5, 2, 2, 2, 9, 1, 1], 10, 3);
        assert_eq!(plan.steps, vec![vec![vec![2, 4], vec![1, 3], vec![0, 5]]]);
        assert_eq!(plan.packed_rows, 6);
    }

    #[test]
    fn stop_and_drop_last_rules() {
        // n = 3, c = 10. Step 0 packs rows 0..6 (5+5 in every bin). Step 1 has only [3, 3]:
        // m = 2 < 3 ranks, so the epoch ends there.
        let plan = plan_epoch(&[5, 5, 5, 5, 5, 5, 3, 3], 10, 3);
        assert_eq!(plan.steps, vec![vec![vec![5, 1], vec![4, 0], vec![3, 2]]]);
        assert_eq!(plan.dropped_rows(), 2);
        // Step 0: window rows 0..5 (33 >= 30); mid 3 fits, mid 4 fits (9 | 5 | 5+5), mid 5
        // fails (9 | 9 | 5+5, then 9+5 = 14): m = 4. Step 1: rows 4..7 = [9, 1, 1] is a full
        // step, but it reaches the end of the epoch: dropped.
        let plan = plan_epoch(&[5, 5, 5, 9, 9, 1, 1], 10, 3);
        assert_eq!((plan.steps.len(), plan.packed_rows), (1, 4));
        let plan = plan_epoch(&[10, 10], 10, 3);
        assert!(plan.steps.is_empty() && plan.dropped_rows() == 2, "fewer samples than ranks");
        assert_eq!(plan.efficiency(), 0.0);
    }

    #[test]
    fn invariants_hold_on_random_epochs() {
        let mut rng = Rng::new(11);
        for trial in 0..60 {
            let world = 1 + rng.below(8) as usize;
            let c = 16 + rng.below(300) as usize;
            let rows = rng.below(400) as usize;
            let lengths: Vec<usize> = (0..rows).map(|_| 1 + rng.below(c as u64) as usize).collect();
            let plan = plan_epoch(&lengths, c, world);
            let mut seen = vec![false; rows];
            let mut tokens = 0;
            for step in &plan.steps {
                assert_eq!(step.len(), world);
                for bin in step {
                    assert!(!bin.is_empty(), "trial {trial}: an empty bin");
                    let load: usize = bin.iter().map(|&i| lengths[i]).sum();
                    assert!(load <= c, "trial {trial}: bin over capacity");
                    for w in bin.windows(2) {
                        assert!((lengths[w[0]], w[0]) > (lengths[w[1]], w[1]), "trial {trial}: not in LPT order");
                    }
                    for &i in bin {
                        assert!(!seen[i], "trial {trial}: row {i} twice");
                        seen[i] = true;
                        tokens += lengths[i];
                    }
                }
            }
            assert!(seen[..plan.packed_rows].iter().all(|&s| s), "trial {trial}: a row lost before the tail");
            assert!(seen[plan.packed_rows..].iter().all(|&s| !s));
            assert_eq!(tokens, plan.packed_tokens);
            if !plan.steps.is_empty() {
                assert!(plan.dropped_rows() >= 1, "trial {trial}: the step reaching the end must be dropped");
            }
        }
    }

    #[test]
    fn every_rank_computes_the_same_plan() {
        let mut rng = Rng::new(5);
        let lengths: Vec<usize> = (0..5000).map(|_| 1 + rng.below(4096) as usize).collect();
        let plans: Vec<EpochPlan> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..4).map(|_| s.spawn(|| plan_epoch(&lengths, 8192, 4))).collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(plans.windows(2).all(|w| w[0] == w[1]));
        assert!(plans[0].efficiency() > 0.9, "efficiency {}", plans[0].efficiency());
    }
}
