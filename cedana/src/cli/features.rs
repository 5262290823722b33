//! `cedana features`: which commands support which types, computed from what is built in.

pub fn run() -> anyhow::Result<i32> {
    anyhow::bail!("features is not built yet")
}
