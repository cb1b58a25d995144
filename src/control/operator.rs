//! What the admin endpoint asks of the control plane: the state of every
//! pool and backend, and operator state changes (drain, maint, ready),
//! which are checked against the bearer token, applied by publishing a new
//! snapshot, and written to the state file.

use tracing::{info, warn};

use super::Controller;
use crate::admin::api::{self, Ask, Refusal};
use crate::config::schema::OnDown;
use crate::state::{self, OperatorState, States};

impl Controller {
    /// Answers one ask of the admin endpoint.
    pub(super) fn answer(&mut self, ask: Ask) {
        match ask {
            Ask::Pools(reply) => {
                let _ = reply.send(self.backends.view(&self.config));
            }
            Ask::SetState {
                pool,
                backend,
                change,
                token,
                done,
            } => {
                let _ = done.send(self.set_state(&pool, &backend, change, token.as_deref()));
            }
        }
    }

    /// Puts backend `name` of `pool` in the state `change` asks for, if
    /// `token` is the configured one: that state and the one it had.
    fn set_state(
        &mut self,
        pool: &str,
        name: &str,
        change: Result<OperatorState, String>,
        token: Option<&str>,
    ) -> Result<(OperatorState, OperatorState), Refusal> {
        let expected = self
            .config
            .admin
            .as_ref()
            .and_then(|admin| admin.token.as_ref())
            .ok_or(Refusal::NoToken)?;
        if !token.is_some_and(|token| api::token_matches(token, &expected.0)) {
            return Err(Refusal::BadToken);
        }
        let state = change.map_err(Refusal::BadBody)?;
        let Some(settings) = self.config.pools.get(pool) else {
            return Err(Refusal::UnknownPool(pool.to_owned()));
        };
        let on_down = settings.on_down();
        let (before, ids) =
            self.backends
                .set_state(pool, name, state)
                .ok_or_else(|| Refusal::UnknownBackend {
                    pool: pool.to_owned(),
                    backend: name.to_owned(),
                    addresses: self.backends.addresses_of(pool, name),
                })?;
        if before == state {
            return Ok((state, before));
        }
        info!(%pool, backend = %name, "operator state {before} -> {state}");
        self.publish_all();
        if state == OperatorState::Maint && on_down == OnDown::Close {
            self.close_sessions(ids.into_iter().map(|id| (id, name.to_owned())).collect());
        }
        self.save_states();
        Ok((state, before))
    }

    /// Takes the operator states of `state_file` (before the first
    /// snapshot, so that a backend left in maint takes no client at start).
    pub(super) fn restore_states(&mut self) {
        let path = &self.config.state_file;
        if path.as_os_str().is_empty() {
            return;
        }
        self.backends.restore(States::load(path));
        state::remove_stale_temporaries(path);
    }

    /// Forgets the operator states of backends the configuration no
    /// longer has (or never had, for states read from the file), and
    /// writes the file without them: memory and file hold the same states.
    /// See [`Backends::forget_absent_states`](super::backends::Backends::forget_absent_states).
    pub(super) fn forget_absent_states(&mut self) {
        let forgotten = self.backends.forget_absent_states(&self.config);
        for ((pool, backend), state) in &forgotten {
            warn!(
                %pool, %backend,
                "the configuration has no such backend: its operator state {state} is forgotten"
            );
        }
        if !forgotten.is_empty() {
            self.save_states();
        }
    }

    /// Writes every operator state to `state_file`, in the background.
    pub(super) fn save_states(&self) {
        let path = &self.config.state_file;
        if path.as_os_str().is_empty() {
            return;
        }
        self.state_writer.write(path, self.backends.states());
    }
}
