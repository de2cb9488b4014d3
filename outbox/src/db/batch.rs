//! "Select a bounded batch of ids, then act on them by id": the one way every bulk change of the
//! library's tables (retention's deletes, expiry, a retry by filter) touches many rows without
//! holding locks on much of a table, or keeping other statements waiting, for long.
//!
//! The select reads at most `limit` ids matching a condition; the action is a single `UPDATE` or
//! `DELETE` of those ids that repeats the condition, so that a row changed in between (claimed,
//! sent, retried) is left alone.

use sea_orm::sea_query::{Condition, Expr, ExprTrait, Query, UpdateStatement};
use sea_orm::{ConnectionTrait, DbErr, EntityTrait, IdenStatic, StatementBuilder};
use uuid::Uuid;

/// What one bounded statement did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Step {
    /// Rows it changed or deleted.
    pub done: u64,
    /// Whether it found a full batch, so that more may be left.
    pub more: bool,
}

/// Selects at most `limit` ids (the UUID column `id` of `entity`) of rows matching `condition`,
/// then runs the statement `act` builds from those ids and the condition (which it must repeat),
/// if any were found.
pub(crate) async fn act_on_some<C, E, S>(
    db: &C,
    entity: E,
    id: E::Column,
    condition: Condition,
    limit: u64,
    act: impl FnOnce(Vec<Uuid>, Condition) -> S,
) -> Result<Step, DbErr>
where
    C: ConnectionTrait,
    E: EntityTrait,
    S: StatementBuilder,
{
    let select = Query::select()
        .column(id)
        .from(entity)
        .cond_where(condition.clone())
        .limit(limit)
        .to_owned();
    let ids: Vec<Uuid> = db
        .query_all(&select)
        .await?
        .iter()
        .map(|row| row.try_get::<Uuid>("", id.as_str()))
        .collect::<Result<_, _>>()?;
    if ids.is_empty() {
        return Ok(Step {
            done: 0,
            more: false,
        });
    }
    let found = ids.len() as u64;
    let statement = act(ids, condition);
    Ok(Step {
        done: db.execute(&statement).await?.rows_affected(),
        more: found >= limit,
    })
}

/// Runs `update` (an `UPDATE` of `entity` that sets its values and has no condition of its own)
/// on every row matching `condition`, [`act_on_some`] after [`act_on_some`] of `limit` ids each,
/// until one finds fewer. Returns how many rows it changed.
pub(crate) async fn update_all<C, E>(
    db: &C,
    entity: E,
    id: E::Column,
    condition: Condition,
    limit: u64,
    update: UpdateStatement,
) -> Result<u64, DbErr>
where
    C: ConnectionTrait,
    E: EntityTrait + Copy,
    E::Column: Copy,
{
    let mut changed = 0;
    loop {
        let step = act_on_some(
            db,
            entity,
            id,
            condition.clone(),
            limit,
            |ids, condition| {
                update
                    .clone()
                    .and_where(Expr::col(id).is_in(ids))
                    .cond_where(condition)
                    .to_owned()
            },
        )
        .await?;
        changed += step.done;
        if !step.more {
            return Ok(changed);
        }
    }
}
