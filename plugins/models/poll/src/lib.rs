//! A poll: the creator asks a question with options; each member votes (and may change the
//! vote) until the creator closes the poll or every member has voted.

use std::collections::BTreeMap;

use canopy_model::{Descriptor, Message, Model, Rendering};
use serde::{Deserialize, Serialize};

/// The poll model.
pub struct Poll;

/// A poll's state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    question: String,
    options: Vec<String>,
    creator: String,
    members: Vec<String>,
    /// Each voter's option, by user.
    votes: BTreeMap<String, usize>,
    closed: bool,
}

#[derive(Deserialize)]
struct Params {
    question: String,
    options: Vec<String>,
}

#[derive(Serialize, Deserialize)]
struct Vote {
    option: usize,
}

impl Model for Poll {
    type State = State;

    fn describe() -> Descriptor {
        Descriptor::new("poll", "1")
            .message("vote", "a member's vote: {\"option\": N}")
            .message("close", "the creator ends the poll")
            .role("creator", "asks, and may close the poll")
            .role("member", "votes")
    }

    fn init(params: &str, creator: &str, members: &[String]) -> Result<State, String> {
        let p: Params = serde_json::from_str(params).map_err(|e| format!("params: {e}"))?;
        if p.question.trim().is_empty() || p.options.len() < 2 {
            return Err("a poll needs a question and at least two options".into());
        }
        let mut members = members.to_vec();
        members.sort();
        members.dedup();
        Ok(State { question: p.question, options: p.options, creator: creator.into(), members, votes: BTreeMap::new(), closed: false })
    }

    fn apply(mut state: State, sender: &str, _time_ms: u64, message: &Message) -> Result<State, String> {
        if state.closed {
            return Err("the poll is closed".into());
        }
        match message.kind.as_str() {
            "vote" => {
                if !state.members.iter().any(|m| m == sender) {
                    return Err(format!("{sender} is not a member of the poll"));
                }
                let vote: Vote = message.json()?;
                if vote.option >= state.options.len() {
                    return Err(format!("there is no option {}", vote.option));
                }
                state.votes.insert(sender.into(), vote.option);
                state.closed = state.votes.len() == state.members.len();
            }
            "close" if sender == state.creator => state.closed = true,
            "close" => return Err("only the creator closes the poll".into()),
            other => return Err(format!("a poll takes no {other:?} message")),
        }
        Ok(state)
    }

    fn view(state: &State, viewer: &str) -> Rendering {
        let status = format!("{} of {} voted{}", state.votes.len(), state.members.len(), if state.closed { ", closed" } else { "" });
        let mut r = Rendering::new(state.question.clone(), status);
        for (i, option) in state.options.iter().enumerate() {
            let n = state.votes.values().filter(|v| **v == i).count();
            let mine = if state.votes.get(viewer) == Some(&i) { " (your vote)" } else { "" };
            r = r.line(format!("{i}. {option}: {n}{mine}"));
        }
        r.closed = state.closed;
        if !state.closed && state.members.iter().any(|m| m == viewer) {
            r = r.action("vote", "vote for an option", &["OPTION"]);
        }
        if !state.closed && viewer == state.creator {
            r = r.action("close", "close the poll", &[]);
        }
        r
    }

    fn act(state: &State, viewer: &str, action: &str, args: &[String]) -> Result<Message, String> {
        match (action, args) {
            ("vote", [option]) => {
                let option = option
                    .parse::<usize>()
                    .ok()
                    .or_else(|| state.options.iter().position(|o| o == option))
                    .filter(|i| *i < state.options.len())
                    .ok_or_else(|| format!("no option {option:?}: pick a number or an option's text"))?;
                let body = serde_json::to_string(&Vote { option }).map_err(|e| e.to_string())?;
                Ok(Message::new("vote", body))
            }
            ("close", []) if viewer == state.creator => Ok(Message::new("close", "{}")),
            ("close", []) => Err("only the creator closes the poll".into()),
            _ => Err(format!("no action {action:?} with {} arguments: see the poll's actions", args.len())),
        }
    }
}

canopy_model::export_model!(Poll);
