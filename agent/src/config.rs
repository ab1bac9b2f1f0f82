//! `worker.toml`: the agent's settings, loaded with every error located.
// Owned by the policy/config work (issue 2); placeholder until it lands.
