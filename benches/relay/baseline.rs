//! `--baseline REV`: every selected run alternates between a fixed older
//! build and this one, in one invocation, and the figures are compared per
//! round and as medians.
//!
//! Why: this VM's speed drifts by ±10 % between runs, so comparing each
//! commit with the one before hides a slow loss (a 38 % one, once). A fixed
//! reference measured in the same minutes as the build under test does not.
//!
//! REV is built once in a git worktree of its own under
//! `target/baseline/<sha>/tree`, with its own target directory beside it
//! (`target/baseline/<sha>/target`), both kept between invocations, so a
//! second invocation only re-runs the measurements. Rounds alternate the
//! order (baseline first in odd rounds, this build first in even ones), and
//! their number is even (4 by default; an odd `--rounds` is raised by one),
//! so a drift within a round, or an advantage of going first, weighs on
//! both sides alike.
//!
//! A run the baseline cannot do (its relay refuses the run's configuration,
//! e.g. a key it does not know yet) is reported as skipped for the baseline,
//! with the relay's own words.

use super::*;

/// Builds (or reuses) REV's release binary; returns its path.
pub(crate) fn build(rev: &str) -> AnyResult<PathBuf> {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let sha = git(repo, &["rev-parse", "--verify", &format!("{rev}^{{commit}}")])?;
    let home = repo.join("target").join("baseline").join(&sha);
    let tree = home.join("tree");
    if !tree.join("Cargo.toml").exists() {
        std::fs::create_dir_all(&home)?;
        // A stale registration (its folder deleted) would refuse the add.
        let _ = git(repo, &["worktree", "prune"]);
        git(repo, &["worktree", "add", "--detach", &tree.to_string_lossy(), &sha])?;
    }
    eprintln!("baseline {rev} ({sha}): building in {}", tree.display());
    let mut cargo = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cargo.args(["build", "--release", "--bin", "switchboard"]).current_dir(&tree);
    // The harness runs with what cargo set for this build: its package
    // variables and this tree's `.cargo/config.toml` `[env]` (CFLAGS, which
    // shape mimalloc's C build). An `[env]` entry does not override a
    // variable that is already set, so the baseline would be built with
    // ours: it gets its own config's instead.
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy().into_owned();
        let from_cargo = key.starts_with("CARGO_") && !matches!(key.as_str(), "CARGO_HOME" | "CARGO_TERM_COLOR");
        if from_cargo || matches!(key.as_str(), "CFLAGS" | "CXXFLAGS" | "RUSTFLAGS" | "OUT_DIR") {
            cargo.env_remove(key);
        }
    }
    let status = cargo.env("CARGO_TARGET_DIR", home.join("target")).status()?;
    if !status.success() {
        return Err(format!("building baseline {rev} failed ({status})").into());
    }
    let bin = home.join("target").join("release").join("switchboard");
    if !bin.exists() {
        return Err(format!("baseline {rev}: no binary at {}", bin.display()).into());
    }
    Ok(bin)
}

fn git(repo: &Path, args: &[&str]) -> AnyResult<String> {
    let out = Command::new("git").args(args).current_dir(repo).output()?;
    if !out.status.success() {
        return Err(format!("git {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()).into());
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// The runs `--only` may name, in the order the harness runs them.
pub(crate) const RUNS: &[&str] =
    &["1", "2", "2e", "2f", "3", "4", "4r", "4t", "4o", "4b", "5", "5b", "5c", "6", "7", "8", "9", "9s", "9k", "9o"];

/// Runs each selected run `rounds` times against each binary, alternating,
/// then prints the comparison.
pub(crate) async fn compare(s: Settings, rev: &str, baseline: PathBuf, rounds: usize) -> AnyResult<()> {
    let this = s.bin.clone();
    // Runs 1 and 2 are measured together; asking for either runs both.
    let mut selected: Vec<&str> = RUNS.iter().copied().filter(|r| s.wants(r) && *r != "1").collect();
    if selected.is_empty() {
        return Err("--only names no run the harness knows".into());
    }
    selected.dedup();
    let mut summary = Vec::new();
    for run in selected {
        // Per side: every round's figures by name.
        let mut sides: [Vec<Vec<Figure>>; 2] = [Vec::new(), Vec::new()];
        let mut skipped: Option<String> = None;
        for round in 0..rounds {
            let order = if round % 2 == 0 { [0, 1] } else { [1, 0] };
            for side in order {
                let (label, bin) =
                    if side == 0 { (format!("baseline {rev}"), &baseline) } else { ("this build".to_string(), &this) };
                if side == 0 && skipped.is_some() {
                    continue;
                }
                println!("\n## run {run}, round {} of {rounds}: {label}", round + 1);
                let one = s.for_run(run, bin.clone());
                match bench(&one).await {
                    Ok(()) => sides[side].push(one.take_figures()),
                    Err(e) if side == 0 => {
                        println!("run {run} skipped for the baseline: {e}");
                        skipped = Some(e.to_string());
                    }
                    Err(e) => return Err(format!("run {run}, this build: {e}").into()),
                }
            }
        }
        summary.push((run, sides, skipped));
    }
    println!("\n## this build against baseline {rev}: medians of {rounds} alternating rounds");
    println!("| run | figure | baseline | this build | ratio per round | median ratio |");
    println!("|---|---|---|---|---|---|");
    for (run, [base, this], skipped) in summary {
        let names: Vec<(String, Better)> =
            this.first().map(|f| f.iter().map(|x| (x.name.clone(), x.better)).collect()).unwrap_or_default();
        for (name, better) in names {
            let pick = |rounds: &[Vec<Figure>]| -> Vec<f64> {
                rounds.iter().filter_map(|f| f.iter().find(|x| x.name == name).map(|x| x.value)).collect()
            };
            let (b, t) = (pick(&base), pick(&this));
            let label = format!("{name} ({})", better.as_str());
            if skipped.is_some() || b.is_empty() {
                println!("| {run} | {label} | skipped (the baseline cannot run it) | {:.1} | | |", median(&t));
                continue;
            }
            let ratios: Vec<f64> = b.iter().zip(&t).map(|(b, t)| t / b).collect();
            let per_round: Vec<String> = ratios.iter().map(|r| format!("{r:.2}")).collect();
            println!(
                "| {run} | {label} | {:.1} | {:.1} | {} | **{:.2}** |",
                median(&b),
                median(&t),
                per_round.join(" / "),
                median(&ratios)
            );
        }
        if let Some(why) = skipped {
            println!("| {run} | | skipped for the baseline: {} | | | |", why.replace('|', "/"));
        }
    }
    Ok(())
}

/// Which way a figure is better.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Better {
    Higher,
    Lower,
}

impl Better {
    fn as_str(self) -> &'static str {
        match self {
            Better::Higher => "higher is better",
            Better::Lower => "lower is better",
        }
    }
}

/// One figure of one run, for the comparison.
#[derive(Clone, Debug)]
pub(crate) struct Figure {
    pub(crate) name: String,
    pub(crate) value: f64,
    pub(crate) better: Better,
}

pub(crate) fn median(v: &[f64]) -> f64 {
    let mut v: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}
