//! The recurrence of every net, as data, against SPEC §1 and §3.

use hrm_cu::config::{ModuleName, NetName};
use hrm_cu::model::schedule::{bp_steps, Pass, Schedule, Slot};

use ModuleName::{H, L};

/// The passes with gradient, named as in SPEC §3 ("L3" = the L pass with k = 3, "H0" = the
/// H pass with i = 0), in forward order.
fn grad_passes(s: &Schedule) -> Vec<String> {
    let (mut l, mut h) = (0, 0);
    let mut names = Vec::new();
    for p in &s.passes {
        // In hrm-style loops an H pass is the one that writes z_H.
        let name = if p.out == Slot::H {
            h += 1;
            format!("H{}", h - 1)
        } else {
            l += 1;
            format!("L{}", l - 1)
        };
        if p.grad {
            names.push(name);
        }
    }
    names
}

fn hrm(bp: usize) -> Schedule {
    Schedule::for_training(&NetName::Hrm.default_net(), bp)
}

#[test]
fn hrm_wiring_follows_spec_loop() {
    let s = hrm(5);
    assert_eq!(s.passes.len(), 8, "H_cycles * (L_cycles + 1)");
    let l = Pass { module: L, z: Slot::L, inj: Some(Slot::H), out: Slot::L, grad: false };
    let h = Pass { module: H, z: Slot::H, inj: Some(Slot::L), out: Slot::H, grad: false };
    let strip = |p: &Pass| Pass { grad: false, ..*p };
    let wiring: Vec<Pass> = s.passes.iter().map(strip).collect();
    assert_eq!(wiring, vec![l, l, l, h, l, l, l, h]);
    assert_eq!(s.output, Slot::H);
}

#[test]
fn hrm_gradient_depth_follows_bp_steps() {
    // SPEC §3: bp_steps = 5 -> H0, L3, L4, L5, H1, and the embedding through H0.
    assert_eq!(grad_passes(&hrm(5)), ["H0", "L3", "L4", "L5", "H1"]);
    assert!(hrm(5).embedding_grad);
    // H_bp = min(2, bp - 1), L_bp = bp - H_bp.
    assert_eq!(grad_passes(&hrm(4)), ["H0", "L4", "L5", "H1"]);
    assert!(hrm(4).embedding_grad);
    assert_eq!(grad_passes(&hrm(3)), ["H0", "L5", "H1"]);
    assert!(hrm(3).embedding_grad);
    // bp_steps = 2: H pass 0 has no gradient, so neither has the embedding (SPEC §7).
    assert_eq!(grad_passes(&hrm(2)), ["L5", "H1"]);
    assert!(!hrm(2).embedding_grad);
    // More steps than passes: gradient everywhere.
    assert_eq!(hrm(20).grad_passes(), 8);
    // bp_steps = 1 names only L5, whose output reaches the loss only through H1, which has
    // no gradient: nothing is left but the LM head.
    assert_eq!(hrm(1).grad_passes(), 0);
    assert!(!hrm(1).embedding_grad);
}

#[test]
fn transformer_is_one_pass_with_gradient() {
    let s = Schedule::for_training(&NetName::Transformer.default_net(), 2);
    assert_eq!(s.passes, vec![Pass { module: ModuleName::Layers, z: Slot::H, inj: None, out: Slot::H, grad: true }]);
    assert!(s.embedding_grad);
}

#[test]
fn trm_runs_one_module_and_never_trains_the_embedding() {
    let s = Schedule::for_training(&NetName::Trm.default_net(), 5);
    assert!(s.passes.iter().all(|p| p.module == L));
    assert_eq!(s.passes.len(), 4, "H_cycles = 2, L_cycles = 1");
    assert_eq!(grad_passes(&s), ["L1", "H1"]);
    assert!(!s.embedding_grad, "SPEC §7: in trm the embedding never gets gradient");
    assert!(s.module_grad(L) && !s.module_grad(H));
}

#[test]
fn trm_match_recurrence_has_hrm_passes_with_one_module() {
    let s = Schedule::for_training(&NetName::TrmMatchRecurrence.default_net(), 2);
    assert!(s.passes.iter().all(|p| p.module == L));
    assert_eq!(grad_passes(&s), grad_passes(&hrm(5)), "H_bp_steps = 2, L_bp_steps = 3");
    assert!(s.embedding_grad);
}

#[test]
fn rins_injects_the_embedding_then_reads_z_l_without_injection() {
    let s = Schedule::for_training(&NetName::Rins.default_net(), 2);
    assert_eq!(s.passes.len(), 8, "L_cycles = 7, then H");
    assert!(s.passes[..7].iter().all(|p| p.module == L && p.z == Slot::L && p.inj == Some(Slot::H) && p.out == Slot::L));
    assert_eq!(s.passes[7], Pass { module: H, z: Slot::L, inj: None, out: Slot::H, grad: true });
    let grads: Vec<bool> = s.passes.iter().map(|p| p.grad).collect();
    assert_eq!(grads, [false, false, false, true, true, true, true, true], "last L_bp_cycles = 4 L passes and H");
    assert_eq!(s.output, Slot::H);
    assert!(s.embedding_grad, "through the injections of L passes 3-6");
}

#[test]
fn ut_loops_one_module_and_reads_its_state() {
    let s = Schedule::for_training(&NetName::Ut.default_net(), 2);
    assert_eq!(s.passes.len(), 4);
    assert!(s.passes.iter().all(|p| p.module == L && p.z == Slot::L && p.inj == Some(Slot::H)));
    let grads: Vec<bool> = s.passes.iter().map(|p| p.grad).collect();
    assert_eq!(grads, [false, false, true, true], "last bp_cycles = 2");
    assert_eq!(s.output, Slot::L);
    assert!(s.embedding_grad);
}

#[test]
fn forward_only_keeps_the_passes_and_drops_every_gradient() {
    for net in [NetName::Hrm, NetName::Transformer, NetName::Trm, NetName::TrmMatchRecurrence, NetName::Rins, NetName::Ut] {
        let net = net.default_net();
        let train = Schedule::for_training(&net, 5);
        let eval = Schedule::forward_only(&net);
        assert_eq!(eval.passes.len(), train.passes.len(), "{net:?}");
        assert_eq!(eval.output, train.output);
        assert_eq!(eval.grad_passes(), 0);
        assert!(!eval.embedding_grad);
    }
}

#[test]
fn bp_steps_warms_up_over_a_fifth_of_training() {
    let net = NetName::Hrm.default_net();
    // total 1000 steps: progress = step / 200, bp = 2 + floor(3 * progress).
    let at = |step| bp_steps(&net, step, 1000, true).unwrap();
    assert_eq!(at(0), 2);
    assert_eq!(at(1), 2);
    assert_eq!(at(66), 2); // 0.99
    assert_eq!(at(67), 3); // 1.005
    assert_eq!(at(133), 3); // 1.995
    assert_eq!(at(134), 4); // 2.01
    assert_eq!(at(199), 4);
    assert_eq!(at(200), 5);
    assert_eq!(at(10_000), 5);
    assert_eq!(bp_steps(&net, 1, 1000, false), Some(5), "fine-tuning: no warm-up");
    assert_eq!(bp_steps(&net, 1, 0, true), Some(5), "no estimate of the run length: full depth");
    assert_eq!(bp_steps(&NetName::Ut.default_net(), 1, 1000, true), None);
    assert_eq!(Schedule::at_step(&net, 67, 1000, true), Schedule::for_training(&net, 3));
    let ut = NetName::Ut.default_net();
    assert_eq!(Schedule::at_step(&ut, 1, 1000, true), Schedule::for_training(&ut, 5), "fixed depth");
}
