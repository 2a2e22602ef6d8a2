//! Write transactions that keygate begins and ends itself.

use sqlx::pool::PoolConnection;
use sqlx::{Any, AnyConnection, AnyPool};

use super::StoreError;

/// A write transaction on a pooled connection. keygate sends BEGIN, COMMIT
/// and ROLLBACK itself, and the connection goes back to the pool only once
/// one of them has ended the transaction cleanly. After a failed COMMIT or
/// ROLLBACK, or a write abandoned half way (an error, the store timeout, a
/// cancelled call), the connection is closed instead, which ends whatever
/// transaction it still had.
///
/// Why not sqlx's transactions: they count the transactions open on a
/// connection and assume ROLLBACK always works. SQLite's fails when SQLite
/// has already rolled back by itself (after an I/O error or a full disk),
/// and sqlx then returned the connection to the pool still counted as in a
/// transaction, or with one still open: its next write ran as a savepoint
/// inside a transaction that never committed, was acknowledged, and was lost.
pub(super) struct WriteTx {
    conn: PoolConnection<Any>,
    ended: bool,
}

impl WriteTx {
    /// Takes a connection from `pool` and begins a transaction on it.
    pub(super) async fn begin(pool: &AnyPool) -> Result<Self, StoreError> {
        let conn = pool.acquire().await?;
        let mut tx = Self { conn, ended: false };
        sqlx::raw_sql("BEGIN").execute(tx.conn()).await?;
        Ok(tx)
    }

    /// The connection, for the transaction's statements.
    pub(super) fn conn(&mut self) -> &mut AnyConnection {
        &mut self.conn
    }

    pub(super) async fn commit(mut self) -> Result<(), StoreError> {
        sqlx::raw_sql("COMMIT").execute(self.conn()).await?;
        self.ended = true;
        Ok(())
    }

    /// Ends the transaction without changing anything (the write found
    /// nothing to do).
    pub(super) async fn rollback(mut self) -> Result<(), StoreError> {
        sqlx::raw_sql("ROLLBACK").execute(self.conn()).await?;
        self.ended = true;
        Ok(())
    }
}

impl Drop for WriteTx {
    fn drop(&mut self) {
        if !self.ended {
            // Closing ends the transaction on both dialects, whatever state
            // the connection was left in.
            self.conn.close_on_drop();
        }
    }
}
