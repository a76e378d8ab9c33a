"""Task passwords: single use by default, safe against lost answers and races; static by
setting; wrong ones rate-limited per task and client address in the store."""

# The shared fixtures are imported from test_intake.py, and pytest passes them by name.
# ruff: noqa: F811

from __future__ import annotations

import re
import threading
from datetime import UTC, datetime, timedelta

import falcon.testing
import sqlalchemy as sa

from services.common.data.intake import tasks
from services.intake import passwords
from tests.unit.test_intake import (
    Intake,
    MakeIntake,
    archive,
    crash_files,
    intake,  # noqa: F401 -- a fixture
    make_intake,  # noqa: F401 -- a fixture
)


def create(intake: Intake) -> tuple[str, str]:
    answer = intake.create(archive(crash_files()))
    assert answer.status_code == 201
    return answer.headers["X-Task-Id"], answer.headers["X-Task-Password"]


def status(intake: Intake, task_id: str, password: str) -> falcon.testing.Result:
    return intake.client.simulate_get(f"/{task_id}", headers={"X-Task-Password": password})


def test_every_answer_carries_a_new_password_and_the_used_one_stops_working(
    intake: Intake,
) -> None:
    task_id, first = create(intake)
    answer = status(intake, task_id, first)
    second = answer.headers["X-Task-Password"]
    assert answer.status_code == 200
    assert second != first
    assert len(second) == 32
    third = status(intake, task_id, second).headers["X-Task-Password"]
    assert third not in (first, second)
    # The first is two rotations old: refused, and the refusal rotates nothing.
    old = status(intake, task_id, first)
    assert old.status_code == 403
    assert "X-Task-Password" not in old.headers
    assert status(intake, task_id, third).status_code == 200


def test_a_client_whose_answer_was_lost_sends_the_old_password_and_gets_the_same_next(
    intake: Intake,
) -> None:
    task_id, first = create(intake)
    lost = status(intake, task_id, first).headers["X-Task-Password"]
    # The answer never arrived; the client tries again with what it has.
    again = status(intake, task_id, first)
    assert again.status_code == 200
    assert again.headers["X-Task-Password"] == lost
    # Once more only: a third use of the same password is refused.
    assert status(intake, task_id, first).status_code == 403
    assert status(intake, task_id, lost).status_code == 200


def test_the_old_password_is_not_accepted_after_the_grace_window(intake: Intake) -> None:
    task_id, first = create(intake)
    status(intake, task_id, first)
    with intake.store.engine.begin() as conn:
        conn.execute(
            sa.update(tasks)
            .where(tasks.c.id == task_id)
            .values(rotated_at=datetime.now(UTC) - timedelta(hours=1))
        )
    assert status(intake, task_id, first).status_code == 403


def test_concurrent_requests_with_one_password_all_get_the_same_valid_next_one(
    intake: Intake,
) -> None:
    task_id, first = create(intake)
    answers: list[falcon.testing.Result] = []
    start = threading.Barrier(2)

    def ask() -> None:
        start.wait()
        answers.append(status(intake, task_id, first))

    threads = [threading.Thread(target=ask) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [a.status_code for a in answers] == [200, 200]
    following = {a.headers["X-Task-Password"] for a in answers}
    assert len(following) == 1
    assert status(intake, task_id, following.pop()).status_code == 200


def test_static_mode_keeps_the_first_password(make_intake: MakeIntake) -> None:
    intake = make_intake(password_mode="static")
    task_id, password = create(intake)
    for _ in range(3):
        answer = status(intake, task_id, password)
        assert answer.status_code == 200
        assert "X-Task-Password" not in answer.headers


def test_wrong_passwords_are_limited_per_task_and_address_but_never_the_right_one(
    make_intake: MakeIntake,
) -> None:
    intake = make_intake(wrong_password_limit=3, wrong_password_window_seconds=600)
    task_id, password = create(intake)
    other_id, other_password = create(intake)
    codes = [status(intake, task_id, "x" * 32).status_code for _ in range(5)]
    assert codes == [403, 403, 403, 429, 429]
    limited = status(intake, task_id, "x" * 32)
    assert int(limited.headers["Retry-After"]) > 0
    assert "too many wrong passwords" in limited.text
    # The right password still works, and other tasks are not affected.
    assert status(intake, task_id, password).status_code == 200
    assert status(intake, other_id, "y" * 32).status_code == 403
    assert status(intake, other_id, other_password).status_code == 200
    # Another client address has its own count.
    elsewhere = intake.client.simulate_get(
        f"/{task_id}", headers={"X-Task-Password": "x" * 32}, remote_addr="192.0.2.7"
    )
    assert elsewhere.status_code == 403


def test_two_workers_of_one_intake_derive_the_same_next_password(
    make_intake: MakeIntake,
) -> None:
    # Two apps on one store and spool stand for two gunicorn workers (or hosts).
    one = make_intake()
    two = make_intake()
    task_id, first = create(one)
    following = status(one, task_id, first).headers["X-Task-Password"]
    assert status(two, task_id, first).headers["X-Task-Password"] == following
    assert status(two, task_id, following).status_code == 200


def test_passwords_are_letters_and_digits_so_no_command_line_takes_one_for_an_option() -> None:
    made = {passwords.new_password() for _ in range(5000)}
    assert len(made) == 5000
    assert all(re.fullmatch(r"[A-Za-z0-9]{32}", password) for password in made)
    # The passwords that replace them on use, too: the same for the same input.
    key = b"k" * 32
    following = {passwords.following(key, "task", password) for password in made}
    assert len(following) == 5000
    assert all(re.fullmatch(r"[A-Za-z0-9]{32}", password) for password in following)
    some = next(iter(made))
    assert passwords.following(key, "task", some) == passwords.following(key, "task", some)
