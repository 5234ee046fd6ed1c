-- Images the text calls healthy whose measured CTR exceeds 0.5 on a PA film: candidates
-- for review (a wrong mask, or a report that missed an enlarged heart). AP films are left
-- out (the heart is magnified there, so 0.5 over-calls); films of unknown view are kept and
-- say so in ctr_note; films the input check flagged are left out. Highest CTR first within
-- each view.
SELECT uid, model, view, ROUND(CAST(ctr AS NUMERIC), 3) AS ctr, ROUND(CAST(quality AS NUMERIC), 3) AS quality, ctr_note, age, sex
FROM label_results
WHERE group_name = 'healthy' AND ctr > 0.5 AND view <> 'AP' AND in_statistics = 1
ORDER BY view, ctr DESC;
