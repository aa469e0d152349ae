"""The Supabase directory's re-check of many users, against the local stand-in for Supabase's endpoints."""

from __future__ import annotations

import uuid

import pytest
from fake_supabase import SERVICE_KEY

from relay import supabase_directory
from relay.supabase_directory import SupabaseDirectory


@pytest.fixture
def directory(supabase):
    made = SupabaseDirectory(supabase.url, SERVICE_KEY)
    yield made
    made._http.close()  # a worker keeps its for good; a test closes it (an unclosed socket warns)


def test_users_a_cut_short_list_did_not_reach_are_asked_by_id(supabase, directory, monkeypatch):
    """A project of more users than the re-check lists (200 pages of 1,000: staff beside a patient app's
    accounts): a connected user past them was never re-checked, so a ban or a move never reached their
    open sockets. They are asked by id, the least recently refreshed first, a bounded number a round."""
    monkeypatch.setattr(supabase_directory, "LIST_PAGE", 10)
    monkeypatch.setattr(supabase_directory, "MAX_LIST_PAGES", 2)  # 20 of the 30 listed
    monkeypatch.setattr(supabase_directory, "MAX_ASKED_ONE_BY_ONE", 2)
    people = [supabase.add_user(f"p{n}@clinic.test", profile={"role": "nurse", "clinic_id": "c-1"}) for n in range(30)]
    listed, banned, moved, third = people[0], people[-1], people[-2], people[-3]
    banned.banned_until = "2999-01-01T00:00:00Z"
    supabase.profiles[moved.id]["clinic_id"] = "c-9"
    gone = str(uuid.uuid4())  # never was: asked by id, not found

    first = directory.get_many([listed.id, banned.id, moved.id, third.id])
    assert first[listed.id].clinic_id == "c-1"
    asked = {user_id for user_id in (banned.id, moved.id, third.id) if user_id in first}
    assert len(asked) == 2  # the bound: the third is left for the next round, not reported gone
    second = directory.get_many([listed.id, banned.id, moved.id, third.id])
    assert {banned.id, moved.id, third.id} - asked <= second.keys()  # the one left out first
    answers = {**first, **second}
    assert answers[banned.id].active is False
    assert answers[moved.id].clinic_id == "c-9"
    assert answers[third.id].active and answers[third.id].role == "nurse"
    assert directory.get_many([gone])[gone] is None
    by_id = [call.path for call in supabase.calls("/auth/v1/admin/users/")]
    assert f"/auth/v1/admin/users/{listed.id}" not in by_id  # listed: not asked again


def test_a_user_who_cannot_be_asked_by_id_is_left_out_and_the_rest_of_the_recheck_is_kept(
    supabase, directory, monkeypatch
):
    """One lookup failing (GoTrue answers 500 for a row inserted by SQL with NULL token columns) threw away
    the whole re-check, the users listed included, round after round: no ban reached anyone."""
    monkeypatch.setattr(supabase_directory, "LIST_PAGE", 10)
    monkeypatch.setattr(supabase_directory, "MAX_LIST_PAGES", 1)
    people = [supabase.add_user(f"p{n}@clinic.test", profile={"role": "nurse", "clinic_id": "c-1"}) for n in range(20)]
    listed, broken, banned = people[0], people[-1], people[-2]
    listed.banned_until = banned.banned_until = "2999-01-01T00:00:00Z"
    supabase.broken_users.add(broken.id)
    answers = directory.get_many([listed.id, broken.id, banned.id])
    assert answers[listed.id].active is False and answers[banned.id].active is False
    assert broken.id not in answers  # not reported: neither gone nor as it was
    assert directory.status()["state"] == "ok"
    supabase.broken_users.update(p.id for p in people[10:])  # Supabase in trouble: three failures end the round
    supabase.reset_calls()
    directory.get_many([p.id for p in people])
    assert len(supabase.calls("/auth/v1/admin/users/")) == 3


def test_an_anonymous_supabase_user_is_never_an_active_user(supabase, directory):
    """A project that allows anonymous sign-ins (a public front end beside the clinic's) made each visitor
    a user of this service (role "user": the system channels); they are refused like a banned user."""
    visitor = supabase.add_user("", is_anonymous=True, app_metadata={"role": "admin"})
    staff = supabase.add_user("n@clinic.test", profile={"role": "nurse", "clinic_id": "c-1"})
    assert directory.get(visitor.id).active is False
    assert directory.get(staff.id).active is True
    fresh = directory.get_many([visitor.id, staff.id])
    assert fresh[visitor.id].active is False and fresh[staff.id].active is True


def test_with_allowed_roles_a_user_of_another_role_is_not_active(supabase):
    """SUPABASE_ALLOWED_ROLES, for a project that must allow sign-ups: someone who signed up (no role: the
    default "user") or holds a role of the other app is refused like a disabled user; staff are not."""
    signed_up = supabase.add_user("someone@example.org")
    patient = supabase.add_user("p@example.org", profile={"role": "patient"})
    nurse = supabase.add_user("n@clinic.test", profile={"role": "nurse", "clinic_id": "c-1"})
    admin = supabase.add_user("a@clinic.test", app_metadata={"role": "admin"})
    directory = SupabaseDirectory(supabase.url, SERVICE_KEY, allowed_roles=frozenset({"admin", "nurse"}))
    try:
        assert [directory.get(u.id).active for u in (signed_up, patient, nurse, admin)] == [False, False, True, True]
        fresh = directory.get_many([u.id for u in (signed_up, patient, nurse, admin)])
        assert [fresh[u.id].active for u in (signed_up, patient, nurse, admin)] == [False, False, True, True]
    finally:
        directory._http.close()
